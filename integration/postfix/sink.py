#!/usr/bin/env python3
"""Scripted SMTP sink that plays mailbox providers on loopback listeners.

Each listener (one loopback address and port) has a provider profile:

* ``ok``        -- 250 to everything.
* ``gmail``     -- accepts ``rate`` messages/s over a sliding window; above it
                   answers the multi-line ``421-4.7.28`` reply (at RCPT, or at
                   end of DATA with ``throttle_at=eod``) and closes.
* ``yahoo``     -- ``421 4.7.0 [TSS04]`` deferrals above the rate.
* ``microsoft`` -- ``451 4.7.500 Server busy ... (AS760)`` above the rate; the
                   connection stays open, as Microsoft's does.

Every rate-limited profile blocks when pushed: ``block_after`` throttled
attempts within ``block_window`` seconds start a block of ``block_duration``
seconds during which every recipient gets the profile's block reply (Gmail
``550 5.7.1 ... blocked``, Yahoo ``554 ... [TS03]``, Microsoft
``550 5.7.1 ... (S3150)``).

Special local parts work on every profile: ``unknown*`` -> 550 5.1.1,
``full*`` -> 452 4.2.2, ``grey*`` -> 451 4.7.1 the first time a
(client, sender, recipient) triple is seen, ``disabled*`` -> 550 5.2.1.

The sink counts what the provider saw (accepted, throttled, blocked, ...,
first throttle and block times, a per-second accept histogram) and exposes the
counts through a JSON stats file and a line-based control port
(``STATS``, ``RESET``, ``SET <listener> <json>``).

``--blackhole ADDR`` adds a listener that never accepts: backlog 0 and an
accept queue the sink fills itself, so connections to it time out like a
silent firewall, without iptables.

Standard library only. Run ``sink.py --help`` for the command line; tests use
:class:`SinkProcess`, which runs the sink as a child process and stops it by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pfx

# Accept times kept per listener (for rate figures); later accepts are only counted.
MAX_ACCEPT_TIMES = 100_000

# Reply templates. A template is one string; "\n" separates the lines of a
# multi-line reply and every line starts with the reply code, as on the wire
# (the writer turns the separator into "-" for all but the last line).
# {ip} is the client's address, {host} the sink's host name, {rcpt} the recipient.
PROFILES: dict[str, dict[str, Any]] = {
    "ok": {
        "rate": None,
    },
    "gmail": {
        "rate": 5.0,
        "throttle_reply": (
            "421 4.7.28 [{ip}] Our system has detected an unusual rate of unsolicited mail\n"
            "421 4.7.28 originating from your IP address. To protect our users from spam, mail\n"
            "421 4.7.28 sent from your IP address has been temporarily rate limited. Please\n"
            "421 4.7.28 visit https://support.google.com/mail/?p=UnsolicitedRateLimitError to\n"
            "421 4.7.28 review our Bulk Email Senders Guidelines. a1si123456plg.99 - gsmtp"
        ),
        "block_reply": (
            "550 5.7.1 [{ip}] Our system has detected an unusual rate of unsolicited mail\n"
            "550 5.7.1 originating from your IP address. To protect our users from spam, mail\n"
            "550 5.7.1 sent from your IP address has been blocked. b2si654321plg.99 - gsmtp"
        ),
    },
    "yahoo": {
        "rate": 5.0,
        "throttle_reply": (
            "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to unexpected "
            "volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes"
        ),
        "block_reply": (
            "554 Message not allowed - [TS03] All messages from {ip} will be permanently "
            "deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes"
        ),
    },
    "microsoft": {
        "rate": 5.0,
        "throttle_reply": "451 4.7.500 Server busy. Please try again later from [{ip}]. (AS760) [{host}]",
        "block_reply": (
            "550 5.7.1 Unfortunately, messages from [{ip}] weren't sent. Please contact your "
            "Internet service provider since part of their network is on our block list (S3150). "
            "You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors. [{host}]"
        ),
    },
}

# Defaults shared by every profile; a profile or the config overrides them.
DEFAULTS: dict[str, Any] = {
    "rate": None,  # accepted messages per second; None = unlimited
    "burst": 0,  # extra messages allowed in one window on top of rate*window
    "window": 1.0,  # seconds of the sliding window the rate is measured over
    "throttle_at": "rcpt",  # "rcpt" or "eod" (end of DATA)
    "block_after": None,  # throttled attempts within block_window that start a block; None = never
    "block_window": 60.0,
    "block_duration": 600.0,
    "throttle_reply": "421 4.7.0 Try again later, closing connection.",
    "block_reply": "550 5.7.1 Service unavailable, Client host [{ip}] blocked",
    "greeting": "220 {host} ESMTP scripted sink",
    "greeting_delay": 0.0,
    "hostname": None,  # defaults to "<profile>-sink.test"
    # Per-recipient replies by local-part prefix, checked after the block and before the rate.
    "special": {
        "unknown": "550 5.1.1 The email account that you tried to reach does not exist.",
        "full": "452 4.2.2 The email account that you tried to reach is over quota.",
        "disabled": "550 5.2.1 The email account that you tried to reach is disabled.",
    },
    "greylist_prefix": "grey",
    "greylist_reply": "451 4.7.1 Greylisted, please try again later",
}

MAX_LINE = 4096  # longest command line accepted (RFC 5321 allows 512; be lenient)
MAX_MESSAGE = 10 * 1024 * 1024  # bigger DATA is answered with 552 and discarded
IDLE_TIMEOUT = 120.0


def profile_params(profile: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge defaults, the named profile and the caller's overrides; reject unknown keys."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    params = copy.deepcopy(DEFAULTS)
    params.update(copy.deepcopy(PROFILES[profile]))
    for key, value in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown sink parameter {key!r}; known: {', '.join(sorted(DEFAULTS))}")
        params[key] = value
    if params["hostname"] is None:
        params["hostname"] = f"{profile}-sink.test"
    if params["throttle_at"] not in ("rcpt", "eod"):
        raise ValueError("throttle_at must be 'rcpt' or 'eod'")
    return params


def render(template: str, **values: str) -> tuple[int, bytes]:
    """Turn a template into (code, wire bytes), multi-line where it has several lines."""
    lines = [line.format(**values) for line in template.split("\n")]
    code = int(lines[0][:3])
    out = []
    for i, line in enumerate(lines):
        if int(line[:3]) != code:
            raise ValueError(f"mixed reply codes in template: {template!r}")
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{line[:3]}{sep}{line[4:]}\r\n")
    return code, "".join(out).encode()


class Provider:
    """One listener's provider: its parameters, rate window, block state and counts."""

    def __init__(self, name: str, profile: str, params: dict[str, Any]):
        self.name = name
        self.profile = profile
        self.params = params
        self.addr = ""
        self.reset()

    def reset(self) -> None:
        self.started_mono = time.monotonic()
        self.started_epoch = time.time()
        self.window_times: collections.deque[float] = collections.deque()
        self.throttle_times: collections.deque[float] = collections.deque()
        self.peak_times: collections.deque[float] = collections.deque()
        self.blocked_until = 0.0
        self.greylist_seen: set[tuple[str, str, str]] = set()
        self.counts = collections.Counter()
        self.histogram: collections.Counter[int] = collections.Counter()
        self.accept_times: list[float] = []  # seconds since start, one per accepted recipient (bounded)
        self.first: dict[str, float] = {}
        self.peak_1s = 0

    def _mark_first(self, what: str, now: float) -> None:
        self.first.setdefault(what, round(now - self.started_mono, 3))

    def capacity(self) -> int:
        p = self.params
        return max(1, int(p["rate"] * p["window"] + 1e-9)) + int(p["burst"])

    def blocked(self, now: float) -> bool:
        return now < self.blocked_until

    def attempt(self, now: float) -> None:
        """A recipient the rate/block logic judged: what the sender offered, accepted or not."""
        self.counts["attempts"] += 1
        self._mark_first("attempt", now)
        self.first["last_attempt"] = round(now - self.started_mono, 3)

    def admit(self, now: float) -> bool:
        """Take a slot in the sliding window, or record a throttled attempt."""
        p = self.params
        if p["rate"] is None:
            return True
        horizon = now - p["window"]
        while self.window_times and self.window_times[0] <= horizon:
            self.window_times.popleft()
        if len(self.window_times) < self.capacity():
            self.window_times.append(now)
            return True
        self.counts["throttled"] += 1
        self._mark_first("throttle", now)
        if p["block_after"] is not None:
            horizon = now - p["block_window"]
            self.throttle_times.append(now)
            while self.throttle_times and self.throttle_times[0] <= horizon:
                self.throttle_times.popleft()
            if len(self.throttle_times) >= p["block_after"]:
                self.blocked_until = now + p["block_duration"]
                self.throttle_times.clear()
                self.counts["block_events"] += 1
                self._mark_first("block", now)
        return False

    def delivered(self, now: float, n: int) -> None:
        """Recipients accepted at end of DATA: the mail the provider really took."""
        self.counts["accepted"] += n
        self.counts["messages"] += 1
        self.histogram[int(now - self.started_mono)] += n
        if len(self.accept_times) < MAX_ACCEPT_TIMES:
            self.accept_times += [round(now - self.started_mono, 3)] * n
        for _ in range(n):
            self.peak_times.append(now)
        while self.peak_times and self.peak_times[0] <= now - 1.0:
            self.peak_times.popleft()
        self.peak_1s = max(self.peak_1s, len(self.peak_times))
        self._mark_first("accept", now)
        self.first["last_accept"] = round(now - self.started_mono, 3)

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        hist = {str(k): v for k, v in sorted(self.histogram.items())}
        return {
            "name": self.name,
            "profile": self.profile,
            "addr": self.addr,
            "params": self.params,
            "started_epoch": self.started_epoch,
            "uptime": round(now - self.started_mono, 3),
            "connections": self.counts["connections"],
            "messages": self.counts["messages"],
            "accepted": self.counts["accepted"],
            "throttled": self.counts["throttled"],
            "blocked": self.counts["blocked"],
            "block_events": self.counts["block_events"],
            "rejected": self.counts["rejected"],
            "deferred": self.counts["deferred"],
            "greylisted": self.counts["greylisted"],
            "attempts": self.counts["attempts"],
            "accept_times": list(self.accept_times),
            "first_attempt": self.first.get("attempt"),
            "last_attempt": self.first.get("last_attempt"),
            "first_accept": self.first.get("accept"),
            "last_accept": self.first.get("last_accept"),
            "first_throttle": self.first.get("throttle"),
            "first_block": self.first.get("block"),
            "blocked_now": self.blocked(now),
            "peak_accepts_1s": self.peak_1s,
            "accept_histogram": hist,
        }


class Session:
    """One SMTP connection to a provider listener."""

    def __init__(self, provider: Provider, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.p = provider
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.ip = peer[0]
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.closing = False

    def vals(self, rcpt: str = "") -> dict[str, str]:
        return {"ip": self.ip, "host": self.p.params["hostname"], "rcpt": rcpt}

    async def send(self, template: str, rcpt: str = "") -> int:
        code, data = render(template, **self.vals(rcpt))
        self.writer.write(data)
        await self.writer.drain()
        if code == 421:
            # RFC 5321: 421 means the server closes the channel.
            self.closing = True
        return code

    async def readline(self) -> bytes | None:
        try:
            line = await asyncio.wait_for(self.reader.readline(), IDLE_TIMEOUT)
        except (asyncio.TimeoutError, ValueError, ConnectionError):
            return None
        return line or None

    async def run(self) -> None:
        p = self.p.params
        self.p.counts["connections"] += 1
        if p["greeting_delay"]:
            await asyncio.sleep(p["greeting_delay"])
        await self.send(p["greeting"])
        while not self.closing:
            raw = await self.readline()
            if raw is None:
                break
            line = raw.decode("latin-1").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            handler = getattr(self, "cmd_" + verb.lower(), None)
            if handler is None:
                await self.send("502 5.5.2 Error: command not recognized")
                continue
            await handler(arg)

    async def cmd_ehlo(self, arg: str) -> None:
        host = self.p.params["hostname"]
        await self.send(f"250 {host}\n250 PIPELINING\n250 SIZE {MAX_MESSAGE}\n250 8BITMIME\n250 ENHANCEDSTATUSCODES")

    async def cmd_helo(self, arg: str) -> None:
        await self.send(f"250 {self.p.params['hostname']}")

    async def cmd_mail(self, arg: str) -> None:
        self.sender = addr_of(arg)
        self.rcpts = []
        await self.send("250 2.1.0 Ok")

    async def cmd_rcpt(self, arg: str) -> None:
        if self.sender is None:
            await self.send("503 5.5.1 Error: need MAIL command")
            return
        rcpt = addr_of(arg)
        await self.send(self.rcpt_reply(rcpt), rcpt)

    def rcpt_reply(self, rcpt: str) -> str:
        p = self.p.params
        now = time.monotonic()
        self.p.attempt(now)
        if self.p.blocked(now):
            self.p.counts["blocked"] += 1
            return p["block_reply"]
        local = rcpt.split("@", 1)[0].lower()
        for prefix, reply in p["special"].items():
            if local.startswith(prefix):
                self.p.counts["rejected" if reply.startswith("5") else "deferred"] += 1
                return reply
        if p["greylist_prefix"] and local.startswith(p["greylist_prefix"]):
            key = (self.ip, self.sender or "", rcpt.lower())
            if key not in self.p.greylist_seen:
                self.p.greylist_seen.add(key)
                self.p.counts["greylisted"] += 1
                return p["greylist_reply"]
        if p["throttle_at"] == "rcpt" and not self.p.admit(now):
            return p["throttle_reply"]
        self.rcpts.append(rcpt)
        return "250 2.1.5 Ok"

    async def cmd_data(self, arg: str) -> None:
        if not self.rcpts:
            await self.send("554 5.5.1 Error: no valid recipients")
            return
        await self.send("354 End data with <CR><LF>.<CR><LF>")
        size = 0
        while True:
            raw = await self.readline()
            if raw is None:
                self.closing = True
                return
            if raw in (b".\r\n", b".\n"):
                break
            size += len(raw)
        rcpts, self.rcpts, self.sender = self.rcpts, [], None
        if size > MAX_MESSAGE:
            await self.send("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        now = time.monotonic()
        p = self.p.params
        if self.p.blocked(now):
            self.p.counts["blocked"] += len(rcpts)
            await self.send(p["block_reply"])
            return
        if p["throttle_at"] == "eod":
            admitted = [self.p.admit(now) for _ in rcpts]
            if not all(admitted):
                # Give back the slots this message took: the provider refused it as a whole.
                for _ in range(sum(admitted)):
                    self.p.window_times.pop()
                await self.send(p["throttle_reply"])
                return
        self.p.delivered(now, len(rcpts))
        await self.send(f"250 2.0.0 Ok: queued as {self.p.counts['messages']:08X}")

    async def cmd_rset(self, arg: str) -> None:
        self.sender, self.rcpts = None, []
        await self.send("250 2.0.0 Ok")

    async def cmd_noop(self, arg: str) -> None:
        await self.send("250 2.0.0 Ok")

    async def cmd_quit(self, arg: str) -> None:
        await self.send("221 2.0.0 Bye")
        self.closing = True


def addr_of(arg: str) -> str:
    """The address inside <...> of a MAIL FROM:/RCPT TO: argument."""
    start, end = arg.find("<"), arg.find(">")
    if start == -1 or end < start:
        return arg.split(":", 1)[-1].strip()
    return arg[start + 1 : end]


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        raise ValueError(f"address must be HOST:PORT, got {text!r}")
    return host, int(port)


def fill_blackhole(host: str, port: int) -> tuple[socket.socket, list[socket.socket]]:
    """A listener that never accepts, its accept queue filled so new connects hang.

    With backlog 0 Linux still queues one completed connection; once it holds
    that, SYNs are dropped and clients see a connect timeout.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(0)
    addr = listener.getsockname()
    fillers: list[socket.socket] = []
    for _ in range(16):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(addr)
        _, writable, _ = select.select([], [s], [], 0.3)
        if writable and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            fillers.append(s)
            continue
        s.close()  # this SYN went unanswered: the queue is full
        break
    else:
        raise RuntimeError("blackhole accept queue never filled")
    return listener, fillers


class Sink:
    """All listeners of one sink process, the control port and the stats file."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.providers: list[Provider] = []
        self.servers: list[asyncio.base_events.Server] = []
        self.blackholes: list[tuple[socket.socket, list[socket.socket]]] = []
        self.stats_file = config.get("stats_file")
        self.stop_event: asyncio.Event | None = None

    def stats(self) -> dict[str, Any]:
        listeners = {p.name: p.stats() for p in self.providers}
        total = collections.Counter()
        for s in listeners.values():
            for key in ("accepted", "throttled", "blocked", "rejected", "deferred", "greylisted", "connections"):
                total[key] += s[key]
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "listeners": listeners,
            "blackholes": [f"{l.getsockname()[0]}:{l.getsockname()[1]}" for l, _ in self.blackholes],
            "total": dict(total),
        }

    def write_stats(self) -> None:
        if not self.stats_file:
            return
        tmp = self.stats_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f, indent=1, sort_keys=True)
        os.replace(tmp, self.stats_file)

    def find(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                cmd, _, arg = raw.decode().strip().partition(" ")
                cmd = cmd.upper()
                try:
                    if cmd == "STATS":
                        reply: Any = self.stats()
                    elif cmd == "RESET":
                        for p in self.providers:
                            p.reset()
                        reply = {"ok": True}
                    elif cmd == "SET":
                        name, _, js = arg.partition(" ")
                        prov = self.find(name)
                        prov.params = profile_params(prov.profile, {**self._overrides(prov), **json.loads(js)})
                        reply = {"ok": True, "params": prov.params}
                    elif cmd == "STOP":
                        reply = {"ok": True}
                        assert self.stop_event is not None
                        self.stop_event.set()
                    else:
                        reply = {"error": f"unknown command {cmd!r}"}
                except (KeyError, ValueError) as e:
                    reply = {"error": str(e)}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        finally:
            writer.close()

    @staticmethod
    def _overrides(prov: Provider) -> dict[str, Any]:
        base = profile_params(prov.profile)
        return {k: v for k, v in prov.params.items() if base.get(k) != v}

    async def serve(self, ready_out) -> None:
        self.stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        for spec in self.config.get("listeners", []):
            host, port = parse_addr(spec["addr"])
            profile = spec.get("profile", "ok")
            overrides = {k: v for k, v in spec.items() if k not in ("addr", "profile", "name")}
            prov = Provider(spec.get("name", profile), profile, profile_params(profile, overrides))

            def handler(r, w, prov=prov):
                return self._session(prov, r, w)

            server = await asyncio.start_server(handler, host, port, limit=MAX_LINE, reuse_address=True)
            h, pt = server.sockets[0].getsockname()[:2]
            prov.addr = f"{h}:{pt}"
            self.providers.append(prov)
            self.servers.append(server)
        for addr in self.config.get("blackholes", []):
            self.blackholes.append(fill_blackhole(*parse_addr(addr)))
        control_addr = None
        if self.config.get("control"):
            host, port = parse_addr(self.config["control"])
            server = await asyncio.start_server(self.control, host, port)
            h, pt = server.sockets[0].getsockname()[:2]
            control_addr = f"{h}:{pt}"
            self.servers.append(server)
        ready = {
            "ready": True,
            "pid": os.getpid(),
            "listeners": {p.name: p.addr for p in self.providers},
            "blackholes": self.stats()["blackholes"],
            "control": control_addr,
        }
        ready_out.write(json.dumps(ready) + "\n")
        ready_out.flush()
        writer_task = asyncio.create_task(self._stats_writer())
        await self.stop_event.wait()
        writer_task.cancel()
        for server in self.servers:
            server.close()
        for listener, fillers in self.blackholes:
            for s in fillers:
                s.close()
            listener.close()
        self.write_stats()

    async def _session(self, prov: Provider, reader, writer) -> None:
        try:
            await Session(prov, reader, writer).run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _stats_writer(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.write_stats()


def parse_listen(text: str) -> dict[str, Any]:
    """ADDR=PROFILE[,key=value...] -> listener spec; values are JSON when they parse as JSON."""
    addr, _, rest = text.partition("=")
    parts = rest.split(",") if rest else ["ok"]
    spec: dict[str, Any] = {"addr": addr, "profile": parts[0]}
    for kv in parts[1:]:
        key, _, value = kv.partition("=")
        try:
            spec[key] = json.loads(value)
        except json.JSONDecodeError:
            spec[key] = value
    return spec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file: {listeners: [{addr, profile, name, <param>...}], blackholes: [ADDR], control, stats_file}")
    ap.add_argument("--listen", action="append", default=[], metavar="ADDR=PROFILE[,k=v...]",
                    help="add a listener, e.g. 127.0.0.5:0=gmail,rate=5,block_after=30 (port 0 picks a free port)")
    ap.add_argument("--blackhole", action="append", default=[], metavar="ADDR", help="add a never-accepting listener")
    ap.add_argument("--control", metavar="ADDR", help="control port (STATS, RESET, SET name {json}, STOP)")
    ap.add_argument("--stats-file", metavar="FILE", help="JSON stats, rewritten every 0.5 s and at exit")
    args = ap.parse_args(argv)
    config: dict[str, Any] = {"listeners": [], "blackholes": []}
    if args.config:
        with open(args.config) as f:
            config.update(json.load(f))
    config["listeners"] = list(config.get("listeners", [])) + [parse_listen(x) for x in args.listen]
    config["blackholes"] = list(config.get("blackholes", [])) + args.blackhole
    if args.control:
        config["control"] = args.control
    if args.stats_file:
        config["stats_file"] = args.stats_file
    asyncio.run(Sink(config).serve(sys.stdout))
    return 0


class SinkProcess:
    """Runs the sink as a child process; stats over the control port; stopped by PID.

    >>> with SinkProcess([{"addr": "127.0.0.5:0", "profile": "gmail", "rate": 5}]) as sink:
    ...     sink.listeners["gmail"]   # "127.0.0.5:41234"
    ...     sink.stats()["listeners"]["gmail"]["accepted"]
    """

    def __init__(self, listeners: list[dict[str, Any]], blackholes: list[str] = (), control_host: str = "127.0.0.1",
                 stats_file: str | None = None, log_file: str | None = None):
        self.config = {
            "listeners": listeners,
            "blackholes": list(blackholes),
            "control": f"{control_host}:0",
            "stats_file": stats_file,
        }
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.listeners: dict[str, str] = {}
        self.blackholes: list[str] = []
        self.control: tuple[str, int] | None = None

    def start(self, timeout: float = 10.0) -> "SinkProcess":
        stderr = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--config", "/dev/stdin"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(self.config))
        self.proc.stdin.close()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError(f"sink did not start (config {self.config})")
        info = json.loads(line)
        self.listeners = info["listeners"]
        self.blackholes = info["blackholes"]
        self.control = parse_addr(info["control"])
        return self

    def addr(self, name: str) -> tuple[str, int]:
        return parse_addr(self.listeners[name])

    def command(self, line: str) -> dict[str, Any]:
        assert self.control is not None
        with socket.create_connection(self.control, timeout=10) as s:
            s.sendall(line.encode() + b"\n")
            f = s.makefile("r")
            return json.loads(f.readline())

    def stats(self) -> dict[str, Any]:
        return self.command("STATS")

    def reset(self) -> None:
        self.command("RESET")

    def set(self, name: str, **params: Any) -> dict[str, Any]:
        return self.command(f"SET {name} {json.dumps(params)}")

    def stop(self) -> None:
        """Stop by PID: SIGTERM, then SIGKILL if it has not exited within 5 s."""
        if self.proc is None:
            return
        pfx.stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "SinkProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
