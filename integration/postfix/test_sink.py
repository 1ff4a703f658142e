"""The provider sink on its own, driven with smtplib (no Postfix)."""

import smtplib
import socket
import time

import pytest

import sink


def rcpt(addr, to, sender="a@sender.test"):
    """One transaction; returns (code, text) of RCPT, or of end of DATA when RCPT passed."""
    with smtplib.SMTP(*addr, timeout=10) as c:
        c.ehlo()
        c.mail(sender)
        code, text = c.rcpt(to)
        if code != 250:
            return code, text.decode()
        code, text = c.data("Subject: t\r\n\r\nbody\r\n")
        return code, text.decode()


def test_render_multiline_and_single():
    code, wire = sink.render("421 4.7.28 a {ip}\n421 4.7.28 b", ip="1.2.3.4")
    assert code == 421 and wire == b"421-4.7.28 a 1.2.3.4\r\n421 4.7.28 b\r\n"
    assert sink.render("250 ok") == (250, b"250 ok\r\n")
    with pytest.raises(ValueError):
        sink.render("421 a\n450 b")


def test_unknown_parameter_rejected():
    with pytest.raises(ValueError):
        sink.profile_params("gmail", {"rate_per_sec": 5})
    with pytest.raises(ValueError):
        sink.profile_params("hotmail")


def test_parse_listen_table():
    assert sink.parse_listen("127.0.0.5:0=gmail,rate=5,block_after=30,throttle_at=eod") == {
        "addr": "127.0.0.5:0", "profile": "gmail", "rate": 5, "block_after": 30, "throttle_at": "eod"}
    assert sink.parse_listen("127.0.0.5:0") == {"addr": "127.0.0.5:0", "profile": "ok"}


def test_special_local_parts_and_greylist(loopback):
    with sink.SinkProcess([{"addr": f"{loopback.addr()}:0", "name": "ok", "profile": "ok"}]) as s:
        a = s.addr("ok")
        assert rcpt(a, "unknown7@x.test")[0] == 550
        assert rcpt(a, "full@x.test") == (452, "4.2.2 The email account that you tried to reach is over quota.")
        assert rcpt(a, "disabled@x.test")[0] == 550
        assert rcpt(a, "grey1@x.test")[0] == 451
        assert rcpt(a, "grey1@x.test")[0] == 250  # same triple: passes the second time
        assert rcpt(a, "grey1@x.test", sender="other@sender.test")[0] == 451
        assert rcpt(a, "bob@x.test")[0] == 250
        st = s.stats()["listeners"]["ok"]
        assert (st["accepted"], st["rejected"], st["deferred"], st["greylisted"]) == (2, 2, 1, 2)


@pytest.mark.parametrize("profile,throttle_code,block_code,marker", [
    ("gmail", 421, 550, "4.7.28"),
    ("yahoo", 421, 554, "[TSS04]"),
    ("microsoft", 451, 550, "(AS760)"),
])
def test_rate_throttle_then_block(loopback, profile, throttle_code, block_code, marker):
    spec = {"addr": f"{loopback.addr()}:0", "name": profile, "profile": profile,
            "rate": 3, "block_after": 4, "block_duration": 60}
    with sink.SinkProcess([spec]) as s:
        a = s.addr(profile)
        replies = [rcpt(a, f"u{i}@x.test") for i in range(10)]
        codes = [c for c, _ in replies]
        assert codes == [250] * 3 + [throttle_code] * 4 + [block_code] * 3
        assert marker in replies[3][1]
        st = s.stats()["listeners"][profile]
        assert (st["accepted"], st["throttled"], st["blocked"], st["block_events"]) == (3, 4, 3, 1)
        assert st["first_throttle"] is not None and st["first_block"] >= st["first_throttle"]
        assert st["blocked_now"] is True
        # Unknown users stay unknown, but a block is checked first.
        assert rcpt(a, "unknown@x.test")[0] == block_code


def test_window_slides_and_block_expires(loopback):
    spec = {"addr": f"{loopback.addr()}:0", "name": "g", "profile": "gmail",
            "rate": 2, "window": 0.5, "block_after": 2, "block_duration": 0.6}
    with sink.SinkProcess([spec]) as s:
        a = s.addr("g")
        assert [rcpt(a, f"u{i}@x.test")[0] for i in range(3)] == [250, 421, 421]  # capacity 1 per 0.5 s
        assert rcpt(a, "v@x.test")[0] == 550  # blocked
        time.sleep(0.7)  # block and window both expired
        assert rcpt(a, "w@x.test")[0] == 250


def test_throttle_at_end_of_data_and_set(loopback):
    spec = {"addr": f"{loopback.addr()}:0", "name": "g", "profile": "gmail", "rate": 1, "throttle_at": "eod"}
    with sink.SinkProcess([spec]) as s:
        a = s.addr("g")
        assert rcpt(a, "u1@x.test")[0] == 250
        code, text = rcpt(a, "u2@x.test")  # RCPT passes, refused after the dot
        assert code == 421 and "4.7.28" in text
        assert s.set("g", rate=100)["ok"] is True
        assert rcpt(a, "u3@x.test")[0] == 250
        assert s.stats()["listeners"]["g"]["throttled"] == 1


def test_blackhole_connect_times_out(loopback):
    with sink.SinkProcess([], blackholes=[f"{loopback.addr()}:0"]) as s:
        host, port = s.blackholes[0].rsplit(":", 1)
        with pytest.raises((TimeoutError, socket.timeout)):
            socket.create_connection((host, int(port)), timeout=1.0)


def test_stats_file_written_at_exit(loopback, tmp_path):
    path = tmp_path / "stats.json"
    s = sink.SinkProcess([{"addr": f"{loopback.addr()}:0", "name": "ok", "profile": "ok"}], stats_file=str(path))
    with s:
        assert rcpt(s.addr("ok"), "bob@x.test")[0] == 250
    import json
    data = json.loads(path.read_text())
    assert data["listeners"]["ok"]["accepted"] == 1
    assert data["total"]["accepted"] == 1
