"""The maillog parser against log lines in the exact shapes Postfix 3.7 writes."""

import pfx

LINES = """\
Nov 24 19:56:39 pfx-test postfix/smtp[11694]: E9B3998C1C3: to=<bob@ok.test>, relay=127.0.0.2[127.0.0.2]:2525, delay=0.01, delays=0.01/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)
Nov 24 19:56:39 pfx-test postfix/smtp[11694]: 0276F98C045: to=<user@hard.test>, relay=127.0.0.2[127.0.0.2]:2525, delay=0.02, delays=0/0/0/0.01, dsn=5.1.1, status=bounced (host 127.0.0.2[127.0.0.2] said: 550 5.1.1 The email account that you tried to reach does not exist (in reply to RCPT TO command))
Nov 24 19:56:39 pfx-test postfix/smtp[11694]: 8593C98C123: to=<user@gmail.test>, relay=127.0.0.2[127.0.0.2]:2525, conn_use=3, delay=2.7, delays=2.7/0/0/0, dsn=4.7.28, status=deferred (host 127.0.0.2[127.0.0.2] said: 421-4.7.28 Gmail has detected (x) 421 4.7.28 originating. (in reply to RCPT TO command))
Nov 24 19:56:40 pfx-test postfix/slow/smtp[15838]: 9DC2898C12E: to=<user@flip2.test>, relay=127.0.0.5[127.0.0.5]:2525, delay=30, delays=30/0.03/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued)
Nov 24 19:56:41 pfx-test postfix/error[16216]: 730FB98C071: to=<user@flip3.test>, relay=none, delay=23, delays=23/0.01/0/0, dsn=4.3.0, status=deferred (address resolver failure)
Nov 24 19:56:41 pfx-test postfix/smtp[12350]: connect to 127.0.0.10[127.0.0.10]:2525: Connection timed out
Nov 24 19:56:42 pfx-test postfix/qmgr[11644]: E9B3998C1C3: removed
Nov 24 19:56:42 pfx-test postfix/discard[11779]: 0709F98C123: to=<alice@sender.test>, relay=none, delay=0.01, delays=0/0/0/0, dsn=2.0.0, status=sent (sender.test)
Nov 24 19:56:43 pfx-test postfix/smtp[11694]: E9B3998C1C4: to=<a@ok.test>, orig_to=<b@ok.test>, relay=127.0.0.2[127.0.0.2]:2525, delay=0.01, delays=0.01/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)
garbage line without a tag
"""


def test_delivery_records_table():
    ds = pfx.parse_deliveries(pfx.parse_log(LINES))
    got = [(d.queue_id, d.tag, d.program, d.service, d.to, d.dsn, d.status) for d in ds]
    assert got == [
        ("E9B3998C1C3", "postfix/smtp", "smtp", "postfix", "bob@ok.test", "2.0.0", "sent"),
        ("0276F98C045", "postfix/smtp", "smtp", "postfix", "user@hard.test", "5.1.1", "bounced"),
        ("8593C98C123", "postfix/smtp", "smtp", "postfix", "user@gmail.test", "4.7.28", "deferred"),
        ("9DC2898C12E", "postfix/slow/smtp", "smtp", "postfix/slow", "user@flip2.test", "2.0.0", "sent"),
        ("730FB98C071", "postfix/error", "error", "postfix", "user@flip3.test", "4.3.0", "deferred"),
        ("0709F98C123", "postfix/discard", "discard", "postfix", "alice@sender.test", "2.0.0", "sent"),
        ("E9B3998C1C4", "postfix/smtp", "smtp", "postfix", "a@ok.test", "2.0.0", "sent"),
    ]


def test_delivery_text_keeps_parentheses_inside():
    d = pfx.parse_deliveries(pfx.parse_log(LINES))[2]
    assert d.text.startswith("host 127.0.0.2[127.0.0.2] said: 421-4.7.28 Gmail has detected (x) 421 4.7.28")
    assert d.text.endswith("(in reply to RCPT TO command)")
    assert d.relay == "127.0.0.2[127.0.0.2]:2525"
    assert d.delay == 2.7 and d.pid == 11694 and d.domain == "gmail.test"


def test_lines_without_queue_id_are_not_deliveries():
    lines = pfx.parse_log(LINES)
    assert any(ln.queue_id is None and ln.msg.startswith("connect to") for ln in lines)
    assert len(lines) == 9  # the garbage line is dropped


def test_normalize_route_table():
    cases = {
        "127.0.0.5:2525": "smtp:[127.0.0.5]:2525",
        "[127.0.0.5]:2525": "smtp:[127.0.0.5]:2525",
        "slow:[127.0.0.5]:2525": "slow:[127.0.0.5]:2525",
        "discard:": "discard:",
    }
    for given, want in cases.items():
        assert pfx.normalize_route(given) == want, given
