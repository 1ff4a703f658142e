#!/usr/bin/env python3
"""Runs mxpace's benchmarks side by side with their references and writes RESULTS.md.

Called by benches/run.sh after the release build (see there for the knobs). Every
figure is measured RUNS times and reported as min / median / max, each run with the
machine's load average at its start, because the machine is shared and noisy; the
engine's hot path is also counted in instructions under callgrind, which the noise
cannot disturb.

Servers (each started fresh, on 127.0.0.1, and stopped after its scenarios):
  mxpace      the release daemon, metrics and admin enabled, state in a temp dir
  baseline    benches/ref/baseline.py: asyncio, answers `action=DUNNO`, does nothing
  postfwd1    Debian's postfwd1 with one rate rule comparable to mxpace's work
All are driven by target/release/mxpace-loadgen with the same generated requests.
"""
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
REL = os.path.join(TARGET, "release")
DATA = os.path.join(ROOT, "..", "shared", "data")
RUNS = int(os.environ.get("RUNS", "3"))
DURATION = float(os.environ.get("DURATION", "5"))
WARMUP = float(os.environ.get("WARMUP", "1"))
DOMAINS = int(os.environ.get("DOMAINS", "1000"))
RESULTS = os.environ.get("RESULTS", os.path.join(ROOT, "benches", "RESULTS.md"))
CALLGRIND = os.environ.get("CALLGRIND", "1") != "0"
POSTFWD_RULE = r"id=RATE01; recipient_domain=~example\.com$; action=rate(recipient_domain/1000000/60/450 4.7.1 rate limit)"

BEGIN = "<!-- benches/run.sh: begin -->"
END = "<!-- benches/run.sh: end -->"


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


class Server:
    """A server process: `addr` to drive, `pid` whose RSS the load generator reads."""

    def __init__(self, name, proc=None, addr=None, pid=None, stop=None):
        self.name, self.proc, self.addr, self.pid, self._stop = name, proc, addr, pid, stop

    def stop(self):
        if self._stop:
            self._stop()
        elif self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_listening(proc, stream, timeout=30.0):
    """The first `listening on ADDR` line of a server's output (a contract of both servers)."""
    found = []
    lines = []

    def reader():
        for raw in stream:
            line = raw.decode(errors="replace")
            m = re.search(r"listening on (\S+)", line)
            if m and not found:
                found.append(m.group(1))
            elif len(lines) < 50:
                lines.append(line)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.time() + timeout
    while not found and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if not found:
        proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    return found[0]


def start_mxpace(tmp, n):
    d = os.path.join(tmp, f"mxpace-{n}")
    os.makedirs(d)
    proc = subprocess.Popen(
        [os.path.join(REL, "mxpace"), "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--state", os.path.join(d, "state.db")],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    addr = wait_listening(proc, proc.stderr)
    return Server("mxpace", proc, addr, proc.pid)


def start_baseline(tmp, n):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "benches", "ref", "baseline.py"), "127.0.0.1", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    addr = wait_listening(proc, proc.stdout)
    return Server("baseline", proc, addr, proc.pid)


def start_postfwd1(tmp, n):
    # postfwd1 listens only as a daemon (-d); its user must be able to write the pid
    # file; -P turns logging off (its best case; -L would write logs into answers).
    d = os.path.join(tmp, f"postfwd-{n}")
    os.makedirs(d)
    os.chmod(d, 0o1777)
    rules = os.path.join(d, "rules.cf")
    with open(rules, "w") as f:
        f.write(POSTFWD_RULE + "\n")
    os.chmod(rules, 0o644)
    port = free_port()
    pidfile = os.path.join(d, "postfwd1.pid")
    cmd = ["postfwd1", "-d", "-f", rules, "--interface", "127.0.0.1", "--port", str(port),
           "--pidfile", pidfile, "-P"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody", "-g", "nogroup"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_port(port):
        raise RuntimeError("postfwd1 did not listen")
    deadline = time.time() + 10
    while not os.path.exists(pidfile) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(open(pidfile).read().strip())

    def stop():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    return Server("postfwd1", None, f"127.0.0.1:{port}", pid, stop)


STARTERS = {"mxpace": start_mxpace, "baseline": start_baseline, "postfwd1": start_postfwd1}

# (key, server, protocol, connections, depth, prime): `prime` runs delivery reports
# first so that policy requests meet tracked destinations, as in production. Keys
# ending in `_ok` send only successful deliveries (no suppression to make durable).
SCENARIOS = [
    ("baseline_policy_c16", "baseline", "policy", 16, 1, False),
    ("baseline_policy_c16_d16", "baseline", "policy", 16, 16, False),
    ("baseline_policy_c1", "baseline", "policy", 1, 1, False),
    ("mxpace_policy_c16", "mxpace", "policy", 16, 1, True),
    ("mxpace_policy_c16_d16", "mxpace", "policy", 16, 16, True),
    ("mxpace_policy_c1", "mxpace", "policy", 1, 1, True),
    ("mxpace_report_c16", "mxpace", "report", 16, 1, False),
    ("mxpace_report_ok_c16", "mxpace", "report", 16, 1, False),
    ("mxpace_report_c1", "mxpace", "report", 1, 1, False),
    ("mxpace_status_c16", "mxpace", "status", 16, 1, False),
    ("mxpace_transport_c16", "mxpace", "transport", 16, 1, True),
    ("mxpace_jsonl_report_c16", "mxpace", "jsonl-report", 16, 1, False),
    ("postfwd1_policy_c16", "postfwd1", "policy", 16, 1, False),
    ("postfwd1_policy_c1", "postfwd1", "policy", 1, 1, False),
]


def loadgen(server, protocol, conns, depth, duration, warmup, label=""):
    extra = ["--delivered", "1"] if label.endswith("_ok_c16") else []
    cmd = [os.path.join(REL, "mxpace-loadgen"), "--target", server.addr, "--protocol", protocol,
           "-c", str(conns), "-d", str(depth), "--duration", str(duration),
           "--warmup", str(warmup), "--domains", str(DOMAINS), "--json", "--label", label,
           "--data", DATA] + extra
    if server.pid:
        cmd += ["--pid", str(server.pid)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    res = json.loads(line)
    if r.returncode != 0:
        log(f"loadgen {label} {protocol}: exit {r.returncode}: {res.get('errors')} {r.stderr[-500:]}")
    return res


def run_scenarios(tmp, raw):
    out = {}
    have_postfwd = shutil.which("postfwd1") is not None
    for n, (key, server, protocol, conns, depth, prime) in enumerate(SCENARIOS):
        if server == "postfwd1" and not have_postfwd:
            log("postfwd1 not installed: skipping its scenarios")
            continue
        for run in range(RUNS):
            s = STARTERS[server](tmp, f"{n}-{run}")
            try:
                if prime:
                    loadgen(s, "report", 16, 1, 2, 0, "prime")
                ld = load()
                res = loadgen(s, protocol, conns, depth, DURATION, WARMUP, key)
                res["load"] = ld
                res["key"] = key
                res["run"] = run
                raw.write(json.dumps(res) + "\n")
                raw.flush()
                out.setdefault(key, []).append(res)
                log(f"{key} run {run + 1}/{RUNS}: {res.get('rps', 0):.0f} req/s, "
                    f"p50 {res.get('p50_us', 0):.0f} µs, p99 {res.get('p99_us', 0):.0f} µs, "
                    f"RSS {res.get('rss_kib')} KiB, load {ld}")
            finally:
                s.stop()
    return out


def bench_binary(name):
    r = subprocess.run(
        ["cargo", "bench", "--bench", name, "--no-run", "--message-format=json"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    exe = None
    for line in r.stdout.splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        if m.get("reason") == "compiler-artifact" and m.get("executable") and \
                m.get("target", {}).get("name") == name:
            exe = m["executable"]
    if not exe:
        raise RuntimeError(f"no executable for bench {name}")
    return exe


def plain_lines(exe, pattern):
    """Runs a bench binary's plain figures only (a criterion filter that matches nothing)."""
    r = subprocess.run([exe, "--bench", "^plain-figures-only$"], cwd=ROOT,
                       capture_output=True, text=True)
    return [l for l in r.stdout.splitlines() if re.match(pattern, l)]


def run_engine(raw):
    """shaping and classify benches (plain figures), RUNS times each."""
    shaping = bench_binary("shaping")
    classify = bench_binary("classify")
    out = {}
    for run in range(RUNS):
        ld = load()
        for l in plain_lines(shaping, r"shaping "):
            m = re.match(r"shaping (\w+): (\d+) ns/decision, \d+ decisions/s, ([\d.]+) allocations", l)
            if m:
                out.setdefault("engine_" + m.group(1), []).append(
                    {"ns": float(m.group(2)), "allocs": float(m.group(3)), "load": ld, "line": l})
            m = re.match(r"shaping memory: (\d+) B/destination allocated, (\d+) B/destination RSS, at (\d+)", l)
            if m:
                out.setdefault("engine_memory", []).append(
                    {"alloc_b": float(m.group(1)), "rss_b": float(m.group(2)),
                     "destinations": int(m.group(3)), "load": ld, "line": l})
        ld = load()
        for l in plain_lines(classify, r"classify: "):
            m = re.match(r"classify: (\d+) replies/s, (\d+) ns/reply", l)
            if m:
                out.setdefault("classify", []).append(
                    {"rps": float(m.group(1)), "ns": float(m.group(2)), "load": ld, "line": l})
        log(f"engine run {run + 1}/{RUNS} done, load {ld}")
    for k, v in out.items():
        for x in v:
            raw.write(json.dumps({"key": k, **x}) + "\n")
    return out, shaping


def run_callgrind(shaping):
    """Instructions per decision: (Ir(2N) − Ir(N)) / N under callgrind."""
    if not CALLGRIND or not shutil.which("valgrind"):
        return {}
    out = {}
    n = 2000
    for case in ["report_delivered", "report_mix", "classify_mix", "admit", "policy"]:
        irs = []
        for iters in (n, 2 * n):
            env = dict(os.environ, MXPACE_SHAPING_CASE=case, MXPACE_SHAPING_ITERS=str(iters))
            r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                                shaping, "--bench"], env=env, capture_output=True, text=True)
            # One line per process valgrind followed; the bench itself is the largest.
            counts = [int(c) for c in re.findall(r"Collected : (\d+)", r.stderr)]
            irs.append(max(counts) if counts else None)
        if None not in irs:
            out[case] = (irs[1] - irs[0]) / n
            log(f"callgrind {case}: {out[case]:.0f} instructions/decision")
    return out


def run_sisimai(raw):
    out = []
    try:
        subprocess.run(["perl", "-MSisimai", "-e", "1"], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        log("Sisimai (libsisimai-perl) not installed: skipping")
        return out
    for run in range(RUNS):
        ld = load()
        r = subprocess.run(["perl", os.path.join(ROOT, "benches", "ref", "sisimai.pl"), DATA, "3"],
                           capture_output=True, text=True, check=True)
        m = re.search(r"sisimai: (\d+) replies/s, (\d+) ns/reply.*?Sisimai (v?[\d.]+)", r.stdout)
        if m:
            x = {"rps": float(m.group(1)), "ns": float(m.group(2)), "version": m.group(3),
                 "load": ld, "line": r.stdout.strip()}
            raw.write(json.dumps({"key": "sisimai", **x}) + "\n")
            out.append(x)
            log(f"sisimai run {run + 1}/{RUNS}: {x['rps']:.0f} replies/s, load {ld}")
    return out


# ---------------------------------------------------------------- report

def mmm(values, fmt="{:,.0f}"):
    v = sorted(x for x in values if x is not None)
    if not v:
        return "–"
    return f"{fmt.format(statistics.median(v))} ({fmt.format(v[0])} – {fmt.format(v[-1])})"


def med(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def machine():
    cpu = "?"
    try:
        for l in open("/proc/cpuinfo"):
            if l.startswith("model name"):
                cpu = l.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for l in open("/proc/meminfo"):
            if l.startswith("MemTotal"):
                mem = f"{int(l.split()[1]) / 1048576:.0f} GiB"
    except OSError:
        pass
    rustc = subprocess.run(["rustc", "-V"], capture_output=True, text=True).stdout.strip()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    pf = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postfwd"],
                        capture_output=True, text=True).stdout.strip() or "not installed"
    return cpu, mem, rustc, rev, pf


def check(ok):
    if ok is None:
        return "–"
    return "met" if ok else "**missed**"


def render(lg, eng, cg, sis, started, finished):
    cpu, mem, rustc, rev, pf = machine()
    L = []
    w = L.append
    w(BEGIN)
    w("## Side by side (`benches/run.sh`)")
    w("")
    w(f"- Machine: {os.cpu_count()} × {cpu}, {mem} RAM, Linux {platform.release()}; {rustc}; mxpace at `{rev}`.")
    w(f"- Date: {started:%Y-%m-%d %H:%M} – {finished:%H:%M} UTC. Load average (1/5/15 min) before the run: "
      f"{lg_load_first(lg, eng)}; the server table lists the load at the start of each run.")
    w(f"- Each figure: **median (min – max) over {RUNS} runs**; loopback, the load generator on the same "
      f"2 cores as the server, closed loop, {DURATION:g} s measured after {WARMUP:g} s warm-up, "
      f"recipients over {DOMAINS} domains × 100 local parts; delivery reports are 70 % `250 2.0.0 Ok` "
      "and 30 % replies drawn from `shared/data` (seed replies and corpus).")
    w("- The machine is shared with other builds while this runs: absolute figures move by tens of "
      "percent between runs (see the load column); the callgrind instruction counts do not.")
    w("")
    w("### Servers under the load generator")
    w("")
    w("| scenario | conns × depth | req/s | p50 µs | p99 µs | p99.9 µs | server RSS KiB | load avg at start |")
    w("|---|---|---|---|---|---|---|---|")
    for key, server, protocol, conns, depth, prime in SCENARIOS:
        rs = lg.get(key)
        if not rs:
            continue
        name = f"{server} {protocol}" + (" (tracked destinations)" if prime else "") + \
            (" (deliveries only)" if "_ok_" in key else "")
        w(f"| {name} | {conns} × {depth} | {mmm([r.get('rps') for r in rs])} | "
          f"{mmm([r.get('p50_us') for r in rs], '{:,.1f}')} | {mmm([r.get('p99_us') for r in rs], '{:,.1f}')} | "
          f"{mmm([r.get('p999_us') for r in rs], '{:,.1f}')} | {mmm([r.get('rss_kib') for r in rs])} | "
          f"{'; '.join(r.get('load', '?') for r in rs)} |")
    w("")

    def m(key, field):
        return med([r.get(field) for r in lg.get(key, [])])

    mx16, pf16, base16 = m("mxpace_policy_c16", "rps"), m("postfwd1_policy_c16", "rps"), m("baseline_policy_c16", "rps")
    mxp99, pfp99 = m("mxpace_policy_c16", "p99_us"), m("postfwd1_policy_c16", "p99_us")
    rep16 = m("mxpace_report_c16", "rps")
    mxd16, based16 = m("mxpace_policy_c16_d16", "rps"), m("baseline_policy_c16_d16", "rps")
    p50c1 = m("mxpace_policy_c1", "p50_us")
    cls = med([x["rps"] for x in eng.get("classify", [])])
    sisr = med([x["rps"] for x in sis])
    dec = med([x["ns"] for x in eng.get("engine_report_delivered", [])])
    memb = med([x["alloc_b"] for x in eng.get("engine_memory", [])])
    memr = med([x["rss_b"] for x in eng.get("engine_memory", [])])

    def ratio(a, b, fmt="{:.1f}×"):
        return fmt.format(a / b) if a and b else "–"

    w("### Ratios (medians)")
    w("")
    w("| ratio | value |")
    w("|---|---|")
    w(f"| mxpace / postfwd1 throughput, policy, 16 connections | {ratio(mx16, pf16)} |")
    w(f"| postfwd1 / mxpace p99, policy, 16 connections (higher = mxpace faster) | {ratio(pfp99, mxp99)} |")
    w(f"| mxpace / do-nothing ceiling, policy, 16 connections | {ratio(mx16, base16, '{:.0%}') if mx16 and base16 else '–'} |")
    w(f"| mxpace / do-nothing ceiling, policy, 16 connections × 16 pipelined | {ratio(mxd16, based16, '{:.0%}') if mxd16 and based16 else '–'} |")
    w(f"| delivery reports / policy throughput, 16 connections | {ratio(rep16, mx16, '{:.0%}') if rep16 and mx16 else '–'} |")
    w(f"| mxpace classifier / Sisimai, replies/s on one core | {ratio(cls, sisr)} |")
    w("")
    w("### Engine and classifier (one thread, in-process)")
    w("")
    w("| figure | median (min – max) | instructions (callgrind) | allocations per call |")
    w("|---|---|---|---|")
    names = {
        "engine_report_delivered": "report → decision, `250 2.0.0 Ok` (ns)",
        "engine_report_mix": "report → decision, 30 % corpus replies (ns)",
        "engine_classify_mix": "… of which classify (ns)",
        "engine_admit": "admission, `transport_maps` (ns)",
        "engine_policy": "`smtpd_access_policy` check (ns)",
    }
    for k, label in names.items():
        v = eng.get(k, [])
        c = cg.get(k.removeprefix("engine_"))
        w(f"| {label} | {mmm([x['ns'] for x in v])} | {f'{c:,.0f}' if c else '–'} | "
          f"{mmm([x['allocs'] for x in v], '{:.3f}')} |")
    v = eng.get("engine_memory", [])
    if v:
        w(f"| bytes per destination at {v[0]['destinations']:,} destinations, allocated | "
          f"{mmm([x['alloc_b'] for x in v])} | | |")
        w(f"| bytes per destination at {v[0]['destinations']:,} destinations, RSS | "
          f"{mmm([x['rss_b'] for x in v])} | | |")
    w(f"| classifier, replies/s (corpus + seed) | {mmm([x['rps'] for x in eng.get('classify', [])])} | | |")
    w(f"| Sisimai {sis[0]['version'] if sis else ''} `Sisimai->match`, replies/s (same texts) | "
      f"{mmm([x['rps'] for x in sis])} | | |")
    w("")
    w("### Targets")
    w("")
    w("| target | measured (median) | |")
    w("|---|---|---|")
    rows = [
        ("≥ 150,000 policy req/s at 16 connections", f"{mx16:,.0f}" if mx16 else "–", mx16 and mx16 >= 150_000),
        ("(the same, 16 connections × 16 pipelined)", f"{mxd16:,.0f}" if mxd16 else "–", mxd16 and mxd16 >= 150_000),
        ("≥ 80 % of the do-nothing ceiling", ratio(mx16, base16, '{:.0%}') if mx16 and base16 else "–",
         mx16 and base16 and mx16 >= 0.8 * base16),
        ("(the same, 16 connections × 16 pipelined)", ratio(mxd16, based16, '{:.0%}') if mxd16 and based16 else "–",
         mxd16 and based16 and mxd16 >= 0.8 * based16),
        ("≥ 25× postfwd", ratio(mx16, pf16), mx16 and pf16 and mx16 >= 25 * pf16),
        ("p99 ≤ 200 µs at 16 connections", f"{mxp99:,.0f} µs" if mxp99 else "–", mxp99 and mxp99 <= 200),
        ("one-connection p50 ≤ 40 µs", f"{p50c1:,.1f} µs" if p50c1 else "–", p50c1 and p50c1 <= 40),
        ("delivery reports within 20 % of policy", ratio(rep16, mx16, '{:.0%}') if rep16 and mx16 else "–",
         rep16 and mx16 and rep16 >= 0.8 * mx16),
        ("classifier ≥ 1,000,000 replies/s/core", f"{cls:,.0f}" if cls else "–", cls and cls >= 1_000_000),
        ("classifier ≥ 50× Sisimai", ratio(cls, sisr), cls and sisr and cls >= 50 * sisr),
        ("decision < 1 µs", f"{dec:,.0f} ns" if dec else "–", dec and dec < 1000),
        ("≤ 256 B per destination (allocated / RSS)",
         f"{memb:,.0f} / {memr:,.0f} B" if memb and memr else "–", memb and memr and max(memb, memr) <= 256),
    ]
    for t, v, ok in rows:
        w(f"| {t} | {v} | {check(None if ok is None else bool(ok))} |")
    w("")
    w(END)
    return "\n".join(L)


def lg_load_first(lg, eng):
    for rs in list(lg.values()) + list(eng.values()):
        if rs and rs[0].get("load"):
            return rs[0]["load"]
    return "?"


def write_results(section):
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        head, sep, tail = text.partition("\n## ")
        text = head.rstrip() + "\n\n" + section + "\n" + (("\n## " + tail) if sep else "")
    with open(RESULTS, "w") as f:
        f.write(text)


def main():
    started = datetime.now(timezone.utc)
    tmp = tempfile.mkdtemp(prefix="mxpace-bench.")
    os.chmod(tmp, 0o755)
    raw_path = os.path.join(tmp, "raw.jsonl")
    log(f"raw results in {raw_path}; load {load()}")
    with open(raw_path, "w") as raw:
        eng, shaping = run_engine(raw)
        cg = run_callgrind(shaping)
        sis = run_sisimai(raw)
        lg = run_scenarios(tmp, raw)
    section = render(lg, eng, cg, sis, started, datetime.now(timezone.utc))
    write_results(section)
    log(f"wrote {RESULTS}")
    print(section)


if __name__ == "__main__":
    main()
