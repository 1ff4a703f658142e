#!/usr/bin/env python3
"""A private, throw-away Postfix instance for end-to-end tests.

:class:`Postfix` writes ``main.cf``/``master.cf``/``transport`` under a temp
directory, starts ``postfix -c DIR`` (as root, no systemd, loopback only, DNS
off, short queue timers, log in ``DIR/maillog`` via postlogd), injects mail
over SMTP, waits for the queue to drain, parses the maillog into
:class:`Delivery` records and stops everything it started by PID.

Wiring a sidecar in is a matter of passing text: ``main_cf_extra`` and
``master_cf_extra`` are appended to the generated files (main.cf: a later
line wins, so the extra text can override any default here, e.g.
``transport_maps``). The submission smtpd always resolves through its own
``rewrite-nosidecar`` trivial-rewrite service whose ``transport_maps`` is only
the harness's texthash table, so submission never depends on the sidecar.

Layout of ``base``::

    conf/main.cf conf/master.cf conf/transport   (mtimes back-dated 10 s)
    spool/        queue_directory
    data/         data_directory (owned by postfix)
    maillog       maillog_file

Every started instance is registered for ``atexit`` clean-up; ``stop()`` runs
``postfix stop``, then kills the master PID and any process whose environment
carries this instance's ``MAIL_CONFIG``, so no master is ever left running.

Standard library only. ``python3 pfx.py --help`` for the small CLI.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import concurrent.futures
import dataclasses
import os
import random
import pty
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable

POSTFIX = "/usr/sbin/postfix"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER_DOMAIN = "sender.test"  # routed to discard:, so bounce notices (NDRs) vanish

# Message-holding queue directories; a queue is empty when none holds a file.
QUEUE_DIRS = ("maildrop", "incoming", "active", "deferred", "hold", "corrupt")


def wait_until(predicate, timeout: float, poll: float = 0.1) -> bool:
    """True once ``predicate()`` holds, False if ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll)



def stop_process(proc: subprocess.Popen, timeout: float = 5) -> int | None:
    """Stop a child by PID: SIGTERM, then SIGKILL if it has not exited within ``timeout``
    seconds. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode

class PostfixError(RuntimeError):
    pass


def require_postfix() -> None:
    """Fail loudly (not skip) when Postfix or root is missing."""
    missing = [p for p in (POSTFIX, SMTP_SOURCE) if not os.access(p, os.X_OK)]
    if missing:
        raise PostfixError(f"{', '.join(missing)} missing: run integration/install-deps.sh as root")
    if os.geteuid() != 0:
        raise PostfixError("a private Postfix instance must be started as root")


# --------------------------------------------------------------------------- addresses


class Loopback:
    """Hands out distinct 127.x.y.z addresses from a random /24 of 127.0.0.0/8.

    One address per simulated destination keeps Postfix's per-destination
    queues and the status-filter keys (which name the IP) apart, and a random
    /24 keeps parallel test runs on one machine out of each other's way.
    """

    def __init__(self, seed: int | None = None):
        rnd = random.Random(seed if seed is not None else os.getpid() ^ time.time_ns())
        self.prefix = f"127.{rnd.randint(16, 250)}.{rnd.randint(0, 255)}"
        self.next = 1

    def addr(self) -> str:
        if self.next > 254:
            raise RuntimeError("loopback /24 exhausted")
        ip = f"{self.prefix}.{self.next}"
        self.next += 1
        return ip


def free_port(host: str) -> int:
    """A port that is free on host right now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- log parsing

LOG_RE = re.compile(
    r"^(?P<ts>\w{3} [ \d]\d \d\d:\d\d:\d\d(?:\.\d+)?) (?P<host>\S+) (?P<tag>[^\s\[]+)\[(?P<pid>\d+)\]: (?P<msg>.*)$"
)
QID_RE = re.compile(r"^(?P<qid>[0-9A-F]{6,}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{12,}): (?P<rest>.*)$")
DELIVERY_RE = re.compile(
    r"^to=<(?P<to>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>\S+), (?:conn_use=\d+, )?"
    r"delay=(?P<delay>[\d.]+), delays=(?P<delays>[\d./]+), dsn=(?P<dsn>\d\.\d{1,3}\.\d{1,3}), "
    r"status=(?P<status>\w+) \((?P<text>.*)\)$"
)


@dataclasses.dataclass(frozen=True)
class LogLine:
    ts: str
    tag: str  # e.g. "postfix/slow/smtp"
    pid: int
    queue_id: str | None
    msg: str  # after "QUEUEID: " when there is one

    @property
    def program(self) -> str:
        """The daemon: "smtp", "qmgr", "error", ... (last part of the tag)."""
        return self.tag.rsplit("/", 1)[-1]

    @property
    def service(self) -> str:
        """The syslog name: "postfix" or "postfix/slow" for a tier transport."""
        return self.tag.rsplit("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One delivery attempt's final log record (``to=<...>, relay=..., status=...``)."""

    ts: str
    tag: str
    pid: int
    queue_id: str
    to: str
    relay: str
    delay: float
    delays: str
    dsn: str
    status: str  # sent | deferred | bounced | expired | undeliverable
    text: str

    @property
    def program(self) -> str:
        return self.tag.rsplit("/", 1)[-1]

    @property
    def service(self) -> str:
        return self.tag.rsplit("/", 1)[0]

    @property
    def domain(self) -> str:
        return self.to.rpartition("@")[2].lower()


def parse_log(text: str) -> list[LogLine]:
    out = []
    for line in text.splitlines():
        m = LOG_RE.match(line)
        if not m:
            continue
        msg = m["msg"]
        qid = None
        q = QID_RE.match(msg)
        if q:
            qid, msg = q["qid"], q["rest"]
        out.append(LogLine(m["ts"], m["tag"], int(m["pid"]), qid, msg))
    return out


def parse_deliveries(lines: Iterable[LogLine]) -> list[Delivery]:
    out = []
    for ln in lines:
        if ln.queue_id is None:
            continue
        m = DELIVERY_RE.match(ln.msg)
        if not m:
            continue
        out.append(Delivery(
            ts=ln.ts, tag=ln.tag, pid=ln.pid, queue_id=ln.queue_id, to=m["to"], relay=m["relay"],
            delay=float(m["delay"]), delays=m["delays"], dsn=m["dsn"], status=m["status"], text=m["text"],
        ))
    return out


# --------------------------------------------------------------------------- injection


@dataclasses.dataclass
class InjectResult:
    """What submission said: queued messages and recipients refused at RCPT."""

    queued: list[str] = dataclasses.field(default_factory=list)  # queue ids
    refused: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)  # rcpt -> (code, text)
    failed: list[str] = dataclasses.field(default_factory=list)  # transaction-level errors
    elapsed: float = 0.0


QUEUED_RE = re.compile(rb"queued as ([0-9A-Za-z]+)")


# --------------------------------------------------------------------------- the instance

_LIVE: set["Postfix"] = set()


@atexit.register
def _stop_all() -> None:
    for inst in list(_LIVE):
        inst.stop()


class Postfix:
    """A private Postfix instance. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        base: str | None = None,
        *,
        smtpd_host: str = "127.0.0.1",
        smtpd_port: int | None = None,
        routes: dict[str, str] | None = None,
        main_cf: dict[str, str] | None = None,
        main_cf_extra: str = "",
        master_cf_extra: str = "",
        keep: bool = False,
        smtpd_rewrite: str = "rewrite-nosidecar",
    ):
        """
        routes: recipient domain -> transport table result, e.g.
            {"gmail.test": "smtp:[127.5.6.2]:2525"}; a bare "HOST:PORT" or
            "[HOST]:PORT" means smtp:[HOST]:PORT. sender.test -> discard: is always added.
        main_cf: parameters that replace the generated defaults (name -> value).
        main_cf_extra / master_cf_extra: text appended verbatim (a sidecar's config).
        keep: leave the directory in place after stop() (for post-mortems).
        smtpd_rewrite: the trivial-rewrite service of the submission smtpd; a sidecar's
            master.cf text may bring its own (mxpace's ``rewrite-nomxpace``).
        """
        self.owns_base = base is None
        self.base = os.path.abspath(base or tempfile.mkdtemp(prefix="pfx-"))
        self.conf_dir = os.path.join(self.base, "conf")
        self.queue_dir = os.path.join(self.base, "spool")
        self.data_dir = os.path.join(self.base, "data")
        self.maillog = os.path.join(self.base, "maillog")
        self.transport_file = os.path.join(self.conf_dir, "transport")
        self.smtpd_host = smtpd_host
        self.smtpd_port = smtpd_port or free_port(smtpd_host)
        self.routes = {SENDER_DOMAIN: "discard:"}
        for domain, route in (routes or {}).items():
            self.routes[domain] = normalize_route(route)
        self.main_cf_overrides = dict(main_cf or {})
        self.main_cf_extra = main_cf_extra
        self.master_cf_extra = master_cf_extra
        self.keep = keep
        self.smtpd_rewrite = smtpd_rewrite
        self.master_pid: int | None = None
        self.started_at: float | None = None

    # ---- configuration

    def main_cf_params(self) -> dict[str, str]:
        b = self.base
        params = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "pfx-test.localdomain",
            "mydomain": "localdomain",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_transport": "error:5.1.1 local delivery disabled in test instance",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            # Must name an address configured on an interface (postfix refuses any
            # other 127.x.y.z); the smtpd line in master.cf binds its own address.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_peername_lookup": "no",
            "relayhost": "",
            # Unrouted domains fail loudly instead of trying DNS.
            "default_transport": "error:5.4.4 no route for this domain in the test instance",
            "harness_transport_maps": f"texthash:{self.transport_file}",
            "transport_maps": "$harness_transport_maps",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtp_tls_security_level": "none",
            "smtputf8_enable": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "8s",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
            "smtp_connect_timeout": "3s",
            "smtp_helo_timeout": "5s",
            "smtp_rcpt_timeout": "10s",
            "smtp_data_done_timeout": "10s",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": b,
        }
        params.update(self.main_cf_overrides)
        return params

    def main_cf_text(self) -> str:
        # A parameter the extra text sets replaces the default instead of following it:
        # every Postfix process would log "overriding earlier entry" for a duplicate,
        # and more than ~10 such warnings at start deadlock postlogd (it logs them to
        # its own datagram socket, whose queue holds net.unix.max_dgram_qlen = 10,
        # before it starts reading it; see NOTES.md).
        overridden = set(main_cf_names(self.main_cf_extra))
        lines = ["# generated by integration/postfix/pfx.py"]
        lines += [f"{k} = {v}" for k, v in self.main_cf_params().items() if k not in overridden]
        if self.main_cf_extra:
            lines += ["", "# ---- extra", self.main_cf_extra.rstrip()]
        return "\n".join(lines) + "\n"

    def master_cf_text(self) -> str:
        smtpd = f"{self.smtpd_host}:{self.smtpd_port}"
        text = f"""\
# generated by integration/postfix/pfx.py; every service unchrooted
{smtpd} inet  n       -       n       -       -       smtpd
  -o rewrite_service_name={self.smtpd_rewrite}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
rewrite-nosidecar unix -  -       n       -       -       trivial-rewrite
  -o transport_maps=$harness_transport_maps
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
  -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
        if self.master_cf_extra:
            text += "\n# ---- extra\n" + self.master_cf_extra.rstrip() + "\n"
        return text

    def transport_text(self) -> str:
        return "".join(f"{d} {r}\n" for d, r in self.routes.items())

    def write_config(self) -> None:
        # mkdtemp makes the base 0700; the postfix user must reach the spool below it.
        os.makedirs(self.base, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.makedirs(self.conf_dir, exist_ok=True)
        # `postfix start` creates the queue subdirectories, but not queue_directory itself.
        os.makedirs(self.queue_dir, exist_ok=True)
        os.makedirs(self.data_dir, exist_ok=True)
        shutil.chown(self.data_dir, "postfix", "postfix")
        files = {
            "main.cf": self.main_cf_text(),
            "master.cf": self.master_cf_text(),
            "transport": self.transport_text(),
        }
        for name, text in files.items():
            path = os.path.join(self.conf_dir, name)
            with open(path, "w") as f:
                f.write(text)
            # Postfix re-reads (and sleeps 300 ms per try) a config younger than ~1 s.
            past = time.time() - 10
            os.utime(path, (past, past))

    def set_routes(self, routes: dict[str, str], reload: bool = True) -> None:
        """Replace the texthash transport table (re-read on reload)."""
        self.routes = {SENDER_DOMAIN: "discard:"}
        self.routes.update({d: normalize_route(r) for d, r in routes.items()})
        self.write_config()
        if reload and self.running():
            self.postfix("reload")

    # ---- processes

    def postfix(self, *args: str, check: bool = True, timeout: float = 60) -> tuple[int, str]:
        """Run ``postfix -c DIR ARGS``; returns (exit code, what it printed).

        postfix prints its errors only to a terminal (otherwise to syslog,
        which this machine lacks, so a bad config fails silently): its stderr
        is a pseudo-terminal here so the reason reaches the exception.
        """
        primary, secondary = pty.openpty()
        try:
            proc = subprocess.Popen([POSTFIX, "-c", self.conf_dir, *args], stdin=subprocess.DEVNULL,
                                    stdout=secondary, stderr=secondary)
            os.close(secondary)
            secondary = -1
            chunks = []
            deadline = time.monotonic() + timeout
            # Read until postfix exits (a daemon it starts may keep the terminal open).
            while True:
                exited = proc.poll() is not None
                ready, _, _ = select.select([primary], [], [], 0 if exited else 0.05)
                if ready:
                    try:
                        data = os.read(primary, 4096)
                    except OSError:  # EIO: every holder of the terminal has closed it
                        data = b""
                    if data:
                        chunks.append(data)
                        continue
                if exited or not ready and time.monotonic() > deadline:
                    break
                if ready:  # EOF/EIO while still running
                    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                    break
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A hung `postfix` command (e.g. postfix-script stuck on logging) is
                # killed by PID; stop() then kills the instance's processes anyway.
                proc.kill()
                proc.wait(5)
                code = -1
                chunks.append(f"\n(postfix {' '.join(args)} timed out after {timeout}s and was killed)".encode())
        finally:
            os.close(primary)
            if secondary != -1:
                os.close(secondary)
        out = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").strip()
        if check and code != 0:
            raise PostfixError(f"postfix {' '.join(args)} exited {code}: {out}\nlog tail:\n{self.log_tail()}")
        return code, out

    def postconf(self, *args: str) -> str:
        return subprocess.run(["/usr/sbin/postconf", "-c", self.conf_dir, *args],
                              capture_output=True, text=True, check=True).stdout

    def start(self, timeout: float = 20) -> "Postfix":
        require_postfix()
        self.write_config()
        _LIVE.add(self)
        try:
            self.postfix("start")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pid = self._read_master_pid()
                if pid and pid_alive(pid) and self._listening():
                    self.master_pid = pid
                    self.started_at = time.time()
                    return self
                time.sleep(0.05)
            raise PostfixError(f"postfix did not come up in {timeout}s; log tail:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _read_master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.smtpd_host, self.smtpd_port), timeout=1):
                return True
        except OSError:
            return False

    def running(self) -> bool:
        pid = self.master_pid or self._read_master_pid()
        return bool(pid and pid_alive(pid))

    def instance_pids(self) -> list[int]:
        """Every live process of this instance: those whose environment has our MAIL_CONFIG."""
        want = b"MAIL_CONFIG=" + self.conf_dir.encode()
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if want in env and pid_alive(int(entry)):
                pids.append(int(entry))
        return pids

    def stop(self, timeout: float = 10) -> None:
        """Stop the instance; kill by PID whatever did not exit; remove the directory unless kept."""
        try:
            if os.path.exists(os.path.join(self.conf_dir, "main.cf")):
                master = self.master_pid or self._read_master_pid()
                if master and pid_alive(master):
                    self.postfix("stop", check=False, timeout=timeout)
                    wait_dead([master], timeout)
                    if pid_alive(master):
                        os.kill(master, signal.SIGKILL)
                        wait_dead([master], 2)
                leftovers = self.instance_pids()
                for pid in leftovers:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                wait_dead(leftovers, 2)
        finally:
            self.master_pid = None
            _LIVE.discard(self)
            if self.owns_base and not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Postfix":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- injection

    def inject(
        self,
        recipients: Iterable[str | list[str]],
        sender: str = f"alice@{SENDER_DOMAIN}",
        connections: int = 4,
        subject: str = "pfx test",
        body: str = "test message\r\n",
    ) -> InjectResult:
        """Submit one message per item (an address or a list of addresses) over SMTP.

        Refused recipients are recorded, never raised, so a test can assert on
        a policy reject's code and text.
        """
        messages = [[r] if isinstance(r, str) else list(r) for r in recipients]
        result = InjectResult()
        t0 = time.monotonic()
        chunks = [messages[i::connections] for i in range(connections)]

        def run(chunk: list[list[str]]) -> InjectResult:
            part = InjectResult()
            if not chunk:
                return part
            with smtplib.SMTP(self.smtpd_host, self.smtpd_port, local_hostname="injector.test", timeout=60) as smtp:
                smtp.ehlo()
                for rcpts in chunk:
                    self._send_one(smtp, sender, rcpts, subject, body, part)
            return part

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, connections)) as pool:
            for part in pool.map(run, chunks):
                result.queued += part.queued
                result.refused.update(part.refused)
                result.failed += part.failed
        result.elapsed = time.monotonic() - t0
        return result

    @staticmethod
    def _send_one(smtp: smtplib.SMTP, sender: str, rcpts: list[str], subject: str, body: str,
                  out: InjectResult) -> None:
        code, text = smtp.mail(sender)
        if code != 250:
            out.failed.append(f"MAIL {code} {text.decode(errors='replace')}")
            smtp.rset()
            return
        good = []
        for r in rcpts:
            code, text = smtp.rcpt(r)
            if code in (250, 251):
                good.append(r)
            else:
                out.refused[r] = (code, text.decode(errors="replace"))
        if not good:
            smtp.rset()
            return
        msg = (f"From: <{sender}>\r\nTo: <{good[0]}>\r\nSubject: {subject}\r\n"
               f"Message-ID: <{time.time_ns()}.{random.getrandbits(32)}@injector.test>\r\n\r\n{body}")
        code, text = smtp.data(msg)
        if code != 250:
            out.failed.append(f"DATA {code} {text.decode(errors='replace')}")
            return
        m = QUEUED_RE.search(text)
        out.queued.append(m.group(1).decode() if m else "?")

    def smtp_source(self, count: int, rcpt: str, sessions: int = 5, sender: str = f"alice@{SENDER_DOMAIN}",
                    numbered: bool = True) -> float:
        """Bulk injection with Postfix's smtp-source; -N makes recipients 1rcpt, 2rcpt, ... distinct."""
        t0 = time.monotonic()
        args = [SMTP_SOURCE, "-m", str(count), "-s", str(sessions), "-f", sender, "-t", rcpt, "-S", "pfx test"]
        if numbered:
            args.append("-N")
        subprocess.run(args + [f"{self.smtpd_host}:{self.smtpd_port}"], check=True, capture_output=True, timeout=300)
        return time.monotonic() - t0

    # ---- queue

    def queue_files(self) -> int:
        n = 0
        for d in QUEUE_DIRS:
            for _, _, files in os.walk(os.path.join(self.queue_dir, d)):
                n += len(files)
        return n

    def deferred_count(self) -> int:
        return sum(len(f) for _, _, f in os.walk(os.path.join(self.queue_dir, "deferred")))

    def wait_empty(self, timeout: float, poll: float = 0.1, nudge: float | None = None) -> bool:
        """True once no message is queued; False when the deadline passes first.

        nudge: every this many seconds, submit one message to ``nudge@sender.test``
        (discarded), as a server's other traffic would. qmgr resolves it, which
        replaces qmgr's one-entry, 30 s resolve cache (see NOTES.md): otherwise a
        lone message that a sidecar's transport map held can sit out those 30 s on
        a quiet instance without the map ever being asked again.
        """
        deadline = time.monotonic() + timeout
        next_nudge = time.monotonic() + nudge if nudge else None
        while True:
            if self.queue_files() == 0:
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            if next_nudge is not None and now >= next_nudge:
                self.inject([f"nudge@{SENDER_DOMAIN}"], connections=1)
                next_nudge = now + nudge
            time.sleep(poll)

    def wait_until(self, predicate, timeout: float, poll: float = 0.1) -> bool:
        return wait_until(predicate, timeout, poll)

    def flush(self) -> None:
        """Ask qmgr to retry deferred mail now (``postqueue -f``)."""
        subprocess.run(["/usr/sbin/postqueue", "-c", self.conf_dir, "-f"], check=True, capture_output=True)

    # ---- log

    def log_text(self) -> str:
        try:
            with open(self.maillog, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_lines(self) -> list[LogLine]:
        return parse_log(self.log_text())

    def deliveries(self, program: str | None = None, domain: str | None = None) -> list[Delivery]:
        """Delivery records, optionally only one program's ("smtp", "error", "discard") or one domain's."""
        out = parse_deliveries(self.log_lines())
        if program is not None:
            out = [d for d in out if d.program == program]
        if domain is not None:
            out = [d for d in out if d.domain == domain.lower()]
        return out

    def status_counts(self, program: str | None = "smtp", domain: str | None = None) -> collections.Counter:
        return collections.Counter(d.status for d in self.deliveries(program, domain))

    def final_statuses(self, domain: str | None = None) -> dict[tuple[str, str], str]:
        """(queue id, recipient) -> the last status logged for it (any program)."""
        out = {}
        for d in self.deliveries(None, domain):
            out[(d.queue_id, d.to)] = d.status
        return out

    def warnings(self) -> list[str]:
        return [f"{ln.tag}: {ln.msg}" for ln in self.log_lines() if ln.msg.startswith(("warning:", "fatal:", "panic:"))]


def main_cf_names(text: str) -> list[str]:
    """Parameter names assigned in main.cf text (``name = value`` at the start of a line)."""
    return [m[1] for m in re.finditer(r"^([A-Za-z0-9_]+)\s*=", text, re.M)]


def normalize_route(route: str) -> str:
    """"HOST:PORT" / "[HOST]:PORT" -> "smtp:[HOST]:PORT"; anything with a transport name stays."""
    if re.fullmatch(r"\[?[\d.]+\]?:\d+", route):
        host, port = route.rsplit(":", 1)
        return f"smtp:[{host.strip('[]')}]:{port}"
    return route


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (this machine's init reaps orphans late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_dead(pids: Iterable[int], timeout: float) -> None:
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run a private Postfix instance for manual experiments.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("start", help="create and start an instance in DIR (left running)")
    up.add_argument("dir")
    up.add_argument("--smtpd", default="127.0.0.1:0", help="HOST:PORT of the submission smtpd (port 0 = free)")
    up.add_argument("--route", action="append", default=[], metavar="DOMAIN=ROUTE",
                    help="e.g. gmail.test=127.0.0.5:2525 or gmail.test=slow:[127.0.0.5]:2525")
    up.add_argument("--main-extra", metavar="FILE", help="text appended to main.cf")
    up.add_argument("--master-extra", metavar="FILE", help="text appended to master.cf")
    down = sub.add_parser("stop", help="stop the instance in DIR (the directory stays)")
    down.add_argument("dir")
    log = sub.add_parser("log", help="summarise deliveries in DIR/maillog")
    log.add_argument("dir")
    inj = sub.add_parser("inject", help="submit messages to the instance in DIR")
    inj.add_argument("dir")
    inj.add_argument("rcpt", nargs="+")
    inj.add_argument("--count", type=int, default=1, help="messages per recipient (local part gets a number)")
    args = ap.parse_args(argv)

    base = os.path.abspath(args.dir)
    if args.cmd == "start":
        host, _, port = args.smtpd.rpartition(":")
        routes = dict(r.split("=", 1) for r in args.route)
        read = lambda p: open(p).read() if p else ""
        pf = Postfix(base, smtpd_host=host, smtpd_port=int(port) or None, routes=routes,
                     main_cf_extra=read(args.main_extra), master_cf_extra=read(args.master_extra), keep=True)
        pf.start()
        _LIVE.discard(pf)  # left running on purpose
        print(f"started: master pid {pf.master_pid}, smtpd {pf.smtpd_host}:{pf.smtpd_port}, log {pf.maillog}")
        return 0
    pf = Postfix(base, keep=True)
    pf.smtpd_host, pf.smtpd_port = _smtpd_of(pf)
    if args.cmd == "stop":
        pf.stop()
        print("stopped")
    elif args.cmd == "log":
        ds = pf.deliveries()
        by = collections.Counter((d.program, d.domain, d.status) for d in ds)
        for (prog, dom, st), n in sorted(by.items()):
            print(f"{n:6d}  {prog:10s} {dom:24s} {st}")
    elif args.cmd == "inject":
        rcpts = []
        for r in args.rcpt:
            local, _, dom = r.partition("@")
            rcpts += [f"{local}{i}@{dom}" if args.count > 1 else r for i in range(args.count)]
        res = pf.inject(rcpts)
        print(f"queued {len(res.queued)}, refused {len(res.refused)}, failed {len(res.failed)} in {res.elapsed:.2f}s")
    return 0


def _smtpd_of(pf: Postfix) -> tuple[str, int]:
    with open(os.path.join(pf.conf_dir, "master.cf")) as f:
        for line in f:
            m = re.match(r"^([\d.]+):(\d+)\s+inet\s", line)
            if m:
                return m[1], int(m[2])
    raise PostfixError("no inet smtpd in master.cf")


if __name__ == "__main__":
    sys.exit(main())
