"""Self-checks of the harness with a real Postfix: routing, bounces, socketmap key formats.

These pin what the sidecar will be built on (see ../../shared/postfix-harness.md
and NOTES.md): what reaches a status filter, in which format, and how Postfix
behaves when a socketmap is down.
"""

import collections
import os
import re
import time

import pytest

import pfx
import sink
from socketmap_recorder import RecorderProcess

# The documented key format: "<enhanced status> <text of the log line's parentheses>".
STATUS_KEY_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} \S.*$")


@pytest.fixture
def sinks(loopback):
    """ok, gmail-like (one accept per 10 s, never blocks), a 421 greeter and a blackhole."""
    listeners = [
        {"addr": f"{loopback.addr()}:0", "name": "ok", "profile": "ok"},
        {"addr": f"{loopback.addr()}:0", "name": "gmail", "profile": "gmail", "rate": 0.1, "window": 10},
        {"addr": f"{loopback.addr()}:0", "name": "greet421", "profile": "ok",
         "greeting": "421 4.3.2 Service not available, closing transmission channel"},
    ]
    with sink.SinkProcess(listeners, blackholes=[f"{loopback.addr()}:0"]) as s:
        yield s


def routes_for(s, loopback):
    refused_ip = loopback.addr()  # nothing listens there
    return {
        "ok.test": s.listeners["ok"],
        "gmail.test": s.listeners["gmail"],
        "greet421.test": s.listeners["greet421"],
        "refused.test": f"{refused_ip}:{pfx.free_port(refused_ip)}",
        "blackhole.test": s.blackholes[0],
    }


def test_delivers_to_ok_sink(sinks, loopback):
    with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes_for(sinks, loopback)) as mta:
        res = mta.inject([f"bob{i}@ok.test" for i in range(10)] + [["m1@ok.test", "m2@ok.test"]])
        assert len(res.queued) == 11 and not res.refused and not res.failed
        assert mta.wait_empty(20), mta.log_tail()
        ds = mta.deliveries("smtp")
        assert collections.Counter(d.status for d in ds) == {"sent": 12}
        host, port = sinks.addr("ok")
        assert {d.relay for d in ds} == {f"{host}[{host}]:{port}"}
        assert {d.queue_id for d in ds} == set(res.queued)
        assert sinks.stats()["listeners"]["ok"]["accepted"] == 12
        assert mta.warnings() == []


def test_unknown_user_bounces_and_ndr_is_discarded(sinks, loopback):
    with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes_for(sinks, loopback)) as mta:
        res = mta.inject(["unknown1@ok.test", "fine@ok.test"])
        assert len(res.queued) == 2
        assert mta.wait_empty(20), mta.log_tail()
        by_to = {d.to: d for d in mta.deliveries("smtp")}
        bounce = by_to["unknown1@ok.test"]
        assert (bounce.status, bounce.dsn) == ("bounced", "5.1.1")
        assert "said: 550 5.1.1 The email account that you tried to reach does not exist." in bounce.text
        assert bounce.text.endswith("(in reply to RCPT TO command)")
        assert by_to["fine@ok.test"].status == "sent"
        # The bounce notice went to the sender domain's discard: route, not to a sink.
        ndr = [d for d in mta.deliveries("discard") if d.to == "alice@sender.test"]
        assert len(ndr) == 1 and ndr[0].status == "sent"
        assert sinks.stats()["listeners"]["ok"]["rejected"] == 1


def test_status_filter_keys_match_log_lines(sinks, loopback, tmp_path, sockdir):
    """Every smtp delivery line reaches the status filter once, as "<dsn> <text>", from that smtp process."""
    sock = os.path.join(sockdir, "status.sock")
    with RecorderProcess([f"unix:{sock}"], str(tmp_path / "queries.jsonl")) as rec:
        extra = f"smtp_delivery_status_filter = socketmap:unix:{sock}:status\n"
        with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes_for(sinks, loopback), main_cf_extra=extra) as mta:
            rcpts = ["ok1@ok.test", "ok2@ok.test", "unknown1@ok.test", "full1@ok.test", "grey1@ok.test",
                     "first@gmail.test", "second@gmail.test", "a@greet421.test", "a@refused.test",
                     "a@blackhole.test"]
            res = mta.inject(rcpts, connections=1)
            assert len(res.queued) == len(rcpts)
            # Every recipient has had its first smtp attempt (the blackhole one takes smtp_connect_timeout).
            assert mta.wait_until(lambda: {d.to for d in mta.deliveries("smtp")} >= set(rcpts), 30), mta.log_tail()
            # A query precedes its log line, and postlogd writes asynchronously while retries go on:
            # compare once both sides agree and stay unchanged for a moment (a mismatch never settles).
            settled = mta.wait_until(lambda: settled_pair(mta, rec), 15)
            smtp_lines = mta.deliveries("smtp")
            queries = rec.queries("status")
            assert settled, (len(smtp_lines), len(queries))

    assert len(smtp_lines) == len(queries)
    # Same (pid, key) multiset: the query of each attempt carries the log line's text, from the same process.
    assert collections.Counter((q["peer_pid"], q["key"]) for q in queries) == \
        collections.Counter((d.pid, f"{d.dsn} {d.text}") for d in smtp_lines)
    for q in queries:
        assert STATUS_KEY_RE.match(q["key"]), q["key"]
        assert "@" not in q["key"]  # no recipient, sender or domain in any key

    keys = {}  # each recipient's first attempt (greylisted and throttled mail is retried)
    for d in smtp_lines:
        keys.setdefault(d.to, f"{d.dsn} {d.text}")
    ok_ip = sinks.addr("ok")[0]
    gmail_ip = sinks.addr("gmail")[0]
    assert keys["ok1@ok.test"].startswith("2.0.0 250 2.0.0 Ok: queued as ")  # success: no host in the key
    assert keys["unknown1@ok.test"] == (
        f"5.1.1 host {ok_ip}[{ok_ip}] said: 550 5.1.1 The email account that you tried to reach does not exist. "
        "(in reply to RCPT TO command)")
    assert keys["full1@ok.test"] == (
        f"4.2.2 host {ok_ip}[{ok_ip}] said: 452 4.2.2 The email account that you tried to reach is over quota. "
        "(in reply to RCPT TO command)")
    assert keys["grey1@ok.test"].startswith(f"4.7.1 host {ok_ip}[{ok_ip}] said: 451 4.7.1 Greylisted")
    # Multi-line reply: the lines are joined with one space and each keeps its code.
    gmail = sorted((keys["first@gmail.test"], keys["second@gmail.test"]))
    assert gmail[0].startswith("2.0.0 250 ")  # one of the two is accepted, the other throttled
    throttled = gmail[1]
    assert throttled.startswith(f"4.7.28 host {gmail_ip}[{gmail_ip}] said: 421-4.7.28 [")
    assert " 421-4.7.28 originating from your IP address." in throttled
    assert " 421 4.7.28 review our Bulk Email Senders Guidelines." in throttled
    g_ip = sinks.addr("greet421")[0]
    assert keys["a@greet421.test"] == (
        f"4.3.2 host {g_ip}[{g_ip}] refused to talk to me: 421 4.3.2 Service not available, "
        "closing transmission channel")
    assert re.fullmatch(r"4\.4\.1 connect to ([\d.]+)\[\1\]:\d+: Connection refused", keys["a@refused.test"])
    assert re.fullmatch(r"4\.4\.1 connect to ([\d.]+)\[\1\]:\d+: Connection timed out", keys["a@blackhole.test"])


def settled_pair(mta, rec, quiet=0.5):
    """True when the smtp log lines and status queries are equal in number and stay so for `quiet` s."""
    n = len(mta.deliveries("smtp"))
    if n != len(rec.queries("status")):
        return False
    time.sleep(quiet)
    return len(mta.deliveries("smtp")) == n == len(rec.queries("status"))


def test_status_filter_can_move_between_4xx_and_5xx_not_to_success(sinks, loopback, tmp_path, sockdir):
    sock = os.path.join(sockdir, "status.sock")
    rules = {"status": [
        [r"^5\.1\.1 ", "OK 4.1.1 held by filter: recipient unknown"],
        [r"^4\.2\.2 ", "OK 2.0.0 pretend success"],
    ]}
    with RecorderProcess([f"unix:{sock}"], str(tmp_path / "q.jsonl"), rules):
        extra = f"smtp_delivery_status_filter = socketmap:unix:{sock}:status\n"
        with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes_for(sinks, loopback), main_cf_extra=extra) as mta:
            mta.inject(["unknown1@ok.test", "full1@ok.test"], connections=1)
            assert mta.wait_until(lambda: len(mta.deliveries("smtp")) >= 2, 20), mta.log_tail()
            by_to = {d.to: d for d in mta.deliveries("smtp")}
            held = by_to["unknown1@ok.test"]
            assert (held.status, held.dsn, held.text) == ("deferred", "4.1.1", "held by filter: recipient unknown")
            kept = by_to["full1@ok.test"]
            assert (kept.status, kept.dsn) == ("deferred", "4.2.2")  # 2.x.x refused, original kept
            assert any("bad status code: 2.0.0 pretend success" in w for w in mta.warnings())
            # The 5.1.1 was held as a deferral: nothing bounced, so no notice went to the sender.
            assert all(d.status != "bounced" for d in mta.deliveries())
            assert mta.deliveries("discard") == []


def test_transport_socketmap_sees_full_addresses_and_submission_survives_it_down(sinks, loopback, tmp_path, sockdir):
    """Keys are whole addresses; retry: holds mail; with the map down smtpd still accepts (rewrite split)."""
    sock = os.path.join(sockdir, "transport.sock")
    record = str(tmp_path / "t.jsonl")
    ok_route = "smtp:[%s]:%d" % sinks.addr("ok")
    rules = {"transport": [
        [r"^paused\d*@ok\.test$", "OK retry:4.7.0 destination paused by sidecar"],
        [r"@ok\.test$", f"OK {ok_route}"],
    ]}
    extra = f"transport_maps = socketmap:unix:{sock}:transport, $harness_transport_maps\n"
    # The texthash table sends ok.test to the 421 greeter: mail reaches the ok sink only by the map's answer.
    # (Submission resolves through the texthash table alone, so it must know every domain, see NOTES.md.)
    routes = routes_for(sinks, loopback)
    routes["ok.test"] = routes["greet421.test"]
    with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes, main_cf_extra=extra) as mta:
        rec = RecorderProcess([f"unix:{sock}"], record, rules).start()
        try:
            res = mta.inject(["a1@ok.test", "paused1@ok.test"], connections=1)
            assert len(res.queued) == 2 and not res.refused
            assert mta.wait_until(lambda: any(d.to == "paused1@ok.test" for d in mta.deliveries()), 20)
            assert mta.wait_until(lambda: any(d.to == "a1@ok.test" for d in mta.deliveries()), 20)
            keys = [q["key"] for q in rec.queries("transport")]
            assert "a1@ok.test" in keys and "paused1@ok.test" in keys
            assert "ok.test" not in keys and ".ok.test" not in keys  # no domain keys for socketmap
            assert "*" in keys  # trivial-rewrite's wildcard probe
            by_to = {d.to: d for d in mta.deliveries()}
            assert (by_to["a1@ok.test"].program, by_to["a1@ok.test"].status) == ("smtp", "sent")
            paused = by_to["paused1@ok.test"]
            assert (paused.program, paused.status, paused.dsn) == ("error", "deferred", "4.7.0")
            assert paused.text == "destination paused by sidecar"
            # Only qmgr's resolver asked about recipients: submission used rewrite-nosidecar.
            resolver_cmds = {open(f"/proc/{q['peer_pid']}/cmdline").read().replace("\0", " ").strip()
                             for q in rec.queries("transport") if os.path.exists(f"/proc/{q['peer_pid']}")}
            print("transport map clients:", resolver_cmds)
            assert resolver_cmds and all("rewrite-nosidecar" not in c for c in resolver_cmds), resolver_cmds
        finally:
            rec.stop()

        # Map down: submission still accepts, delivery waits (deferred, never bounced).
        res = mta.inject(["down1@ok.test"], connections=1)
        assert len(res.queued) == 1 and not res.refused
        assert mta.wait_until(
            lambda: any(d.to == "down1@ok.test" and d.text == "address resolver failure" for d in mta.deliveries()), 20
        ), mta.log_tail()
        down = [d for d in mta.deliveries() if d.to == "down1@ok.test"][0]
        assert (down.program, down.status, down.dsn) == ("error", "deferred", "4.3.0")
        # Back up: the deferred mail goes out without any help.
        down_attempts = sum(1 for d in mta.deliveries() if d.to == "down1@ok.test")
        with RecorderProcess([f"unix:{sock}"], record, rules):
            t_up = time.monotonic()
            assert mta.wait_until(
                lambda: any(d.to == "down1@ok.test" and d.status == "sent" for d in mta.deliveries()), 45
            ), mta.log_tail()
            print(f"map back up -> deferred mail sent in {time.monotonic() - t_up:.1f}s "
                  f"({down_attempts} deferral(s) while down)")
        ok_host, ok_port = sinks.addr("ok")
        sent = [d for d in mta.deliveries() if d.to == "down1@ok.test" and d.status == "sent"][0]
        assert sent.relay == f"{ok_host}[{ok_host}]:{ok_port}"  # the map's route, not the texthash one
        assert not any(d.status == "bounced" for d in mta.deliveries())


def test_status_filter_down_fails_open(sinks, loopback, sockdir):
    """With nothing listening on the status filter's socket, every status stays what the remote said."""
    sock = os.path.join(sockdir, "nobody.sock")
    extra = f"smtp_delivery_status_filter = socketmap:unix:{sock}:status\n"
    with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes_for(sinks, loopback), main_cf_extra=extra) as mta:
        mta.inject(["ok1@ok.test", "unknown1@ok.test", "full1@ok.test"], connections=1)
        assert mta.wait_until(lambda: len(mta.deliveries("smtp")) >= 3, 20), mta.log_tail()
        by_to = {d.to: (d.status, d.dsn) for d in mta.deliveries("smtp")}
        assert by_to == {"ok1@ok.test": ("sent", "2.0.0"), "unknown1@ok.test": ("bounced", "5.1.1"),
                         "full1@ok.test": ("deferred", "4.2.2")}
        warnings = mta.warnings()
        assert any("status lookup error" in w or "lookup error" in w for w in warnings), warnings


def test_tier_transport_paces_one_destination(sinks, loopback):
    """A tier transport (concurrency 1, rate delay 1 s) spaces deliveries; other domains are unaffected."""
    master = "slow1 unix - - n - - smtp\n  -o syslog_name=postfix/slow1\n"
    main = "slow1_destination_concurrency_limit = 1\nslow1_destination_rate_delay = 1s\n"
    routes = routes_for(sinks, loopback)
    routes["slow.test"] = "slow1:[%s]:%d" % sinks.addr("ok")
    with pfx.Postfix(smtpd_host=loopback.addr(), routes=routes, main_cf_extra=main, master_cf_extra=master) as mta:
        sinks.reset()
        mta.inject([f"s{i}@slow.test" for i in range(4)] + [f"f{i}@ok.test" for i in range(4)])
        assert mta.wait_empty(30), mta.log_tail()
        slow = mta.deliveries(domain="slow.test")
        assert [(d.tag, d.status) for d in slow] == [("postfix/slow1/smtp", "sent")] * 4
        assert {(d.tag, d.status) for d in mta.deliveries(domain="ok.test")} == {("postfix/smtp", "sent")}
        # The qmgr delay column grows by the rate delay per message: 0, ~1, ~2, ~3 s.
        waits = sorted(float(d.delays.split("/")[1]) for d in slow)
        print("slow1 qmgr waits:", waits)
        assert waits[-1] > waits[0]
