#!/usr/bin/env python3
"""The real mxpace daemon as a child process of a test, and its operator surfaces.

:func:`binary` builds mxpace with ``cargo build`` (once per process; cargo is a
no-op when the binary is fresh) and returns the executable's path, wherever
``CARGO_TARGET_DIR`` puts it. ``MXPACE_BIN`` names a prebuilt binary instead.

:class:`Mxpace` writes a TOML config, runs ``mxpace serve`` on free loopback
ports, waits for its ``listening on ADDR`` lines, and stops it by PID: SIGTERM
for a clean stop, SIGKILL to simulate a crash, and a restart on the *same*
ports (Postfix's main.cf points at them). It reads the Prometheus endpoint,
talks to the admin port through ``mxpace ctl``, and renders the Postfix lines
with ``mxpace postfix-config``, the text an operator pastes.

Standard library only.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pfx

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

_BINARY: str | None = None


def binary() -> str:
    """Path of the mxpace executable, built by cargo if needed."""
    global _BINARY
    if _BINARY:
        return _BINARY
    if os.environ.get("MXPACE_BIN"):
        _BINARY = os.path.abspath(os.environ["MXPACE_BIN"])
        return _BINARY
    proc = subprocess.run(
        ["cargo", "build", "--bin", "mxpace", "--message-format=json-render-diagnostics"],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"cargo build failed:\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg.get("target", {}).get("name") == "mxpace":
            _BINARY = msg["executable"]
    if not _BINARY:
        raise RuntimeError("cargo build did not report the mxpace executable")
    return _BINARY


def run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """``mxpace ARGS`` with captured text output."""
    proc = subprocess.run([binary(), *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"mxpace {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


# --------------------------------------------------------------------------- metrics

METRIC_RE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format → name → [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = METRIC_RE.match(line)
        if m:
            labels = dict(LABEL_RE.findall(m["labels"] or ""))
            out[m["name"]].append((labels, float(m["value"])))
    return out


def metric_sum(metrics: dict, name: str, **want: str) -> float:
    """Sum of a metric's samples whose labels include ``want``."""
    return sum(v for labels, v in metrics.get(name, []) if all(labels.get(k) == x for k, x in want.items()))


# --------------------------------------------------------------------------- the daemon

_LIVE: set["Mxpace"] = set()


@atexit.register
def _stop_all() -> None:
    for d in list(_LIVE):
        d.kill()


class Mxpace:
    """One mxpace daemon. ``config`` is TOML text; listeners, metrics and admin are given on the command line."""

    def __init__(self, config: str, host: str = "127.0.0.1", base: str | None = None, keep: bool = False):
        self.owns_base = base is None
        self.keep = keep
        self.base = base or tempfile.mkdtemp(prefix="mxpace-")
        os.chmod(self.base, 0o755)
        self.host = host
        self.config_path = os.path.join(self.base, "mxpace.toml")
        self.state_path = os.path.join(self.base, "state.redb")
        self.log_path = os.path.join(self.base, "mxpace.log")
        with open(self.config_path, "w") as f:
            f.write(config)
        # Fixed on the first start, so a restart comes back where Postfix looks for it.
        self.listen: str | None = None
        self.metrics_addr: str | None = None
        self.admin_addr: str | None = None
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    # ---- life cycle

    def start(self, timeout: float = 20) -> "Mxpace":
        if self.listen is None:
            # Free ports chosen up front: a restart must reuse them.
            self.listen = f"{self.host}:{pfx.free_port(self.host)}"
            self.metrics_addr = f"{self.host}:{pfx.free_port(self.host)}"
            self.admin_addr = f"{self.host}:{pfx.free_port(self.host)}"
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary(), "serve", "--config", self.config_path, "--listen", self.listen,
             "--metrics-listen", self.metrics_addr, "--admin-listen", self.admin_addr,
             "--state", self.state_path],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.base,
        )
        log.close()
        _LIVE.add(self)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mxpace exited {self.proc.returncode}:\n{self.log_text()[offset:][-3000:]}")
            if f"listening on {self.listen}" in self.log_text()[offset:]:
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mxpace did not report `listening on {self.listen}` in {timeout}s:\n"
                           f"{self.log_text()[offset:][-3000:]}")

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM and wait; SIGKILL if it lingers. Returns the exit code."""
        if not self.proc:
            return None
        code = pfx.stop_process(self.proc, timeout)
        _LIVE.discard(self)
        return code

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to flush or say goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        _LIVE.discard(self)

    def alive(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def __enter__(self) -> "Mxpace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop, and remove the directory (config, state, log) unless kept."""
        self.stop()
        if self.owns_base and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # ---- what it says

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=5) as r:
            return parse_metrics(r.read().decode())

    def replies(self, **labels: str) -> int:
        """Reports received (``mxpace_replies_total``), optionally for one site/class."""
        return int(metric_sum(self.metrics(), "mxpace_replies_total", **labels))

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ctl", "--admin", self.admin_addr, *args, check=check)

    def status(self) -> dict:
        return json.loads(self.ctl("--json", "status").stdout)

    def destination(self, site: str) -> dict | None:
        for d in self.status().get("destinations", []):
            if d["site"] == site:
                return d
        return None

    # ---- Postfix wiring

    @property
    def endpoint(self) -> str:
        return f"inet:{self.listen}"

    def postfix_config(self) -> tuple[str, str]:
        """(main.cf text, master.cf text) from ``mxpace postfix-config`` for this daemon's address."""
        common = ["postfix-config", "--config", self.config_path,
                  "--socketmap-endpoint", self.endpoint, "--policy-endpoint", self.endpoint]
        return run(*common, "--main").stdout, run(*common, "--master").stdout


def provider_toml(site: str, domain: str, host: str, port: int, **overrides) -> str:
    """A ``[providers.SITE]`` section that shapes ``domain`` on the sink at ``host:port``."""
    lines = [f"[providers.{site}]", f'domains = ["{domain}"]', f'mx = ["{host}"]',
             f'nexthop = "[{host}]:{port}"']
    for k, v in overrides.items():
        lines.append(f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def postfix_kwargs(daemon: Mxpace) -> dict:
    """Keyword arguments for :class:`pfx.Postfix` that wire it to ``daemon``.

    Exactly the ``mxpace postfix-config`` text, with the one blank an operator
    fills in: ``mxpace_fallback_transport_maps`` names their own transport
    table, here the harness's texthash routes. The submission smtpd uses the
    generated ``rewrite-nomxpace`` service.
    """
    main, master = daemon.postfix_config()
    main, n = re.subn(r"^mxpace_fallback_transport_maps =.*$",
                      "mxpace_fallback_transport_maps = $harness_transport_maps", main, flags=re.M)
    if n != 1:
        raise RuntimeError("postfix-config output has no mxpace_fallback_transport_maps line")
    return {"main_cf_extra": main, "master_cf_extra": master, "smtpd_rewrite": "rewrite-nomxpace"}


# Queue timers for tests: paced mail comes back within 1-2 s (written by postfix-config).
FAST_QUEUE = """
[postfix]
queue_run_delay = "1s"
minimal_backoff_time = "1s"
maximal_backoff_time = "2s"
"""
