#!/usr/bin/env python3
"""Socketmap server that records every query Postfix makes, for checking key formats.

Speaks the socketmap protocol (netstrings: request ``<name> <key>``, reply
``OK <value>`` / ``NOTFOUND `` / ``TEMP <reason>`` / ``PERM <reason>``) on an
inet (``HOST:PORT``) or unix (``unix:/path``) address. Every query is appended
as one JSON line to the record file: time, map name, key, the reply sent and,
on unix sockets, the peer's PID from ``SO_PEERCRED`` (which equals the PID in
the Postfix log line of the delivery the query belongs to).

Replies come from rules ``{"<map name>": [["<regex>", "<reply>"], ...]}``:
the first regex that matches the key (``re.search``) gives the reply; no match
answers ``NOTFOUND``. The reply ``@hang`` never answers (to see Postfix's
100 s socketmap timeout). This is a stand-in for checking formats only; the
product's own daemon is what the end-to-end tests wire in.

Standard library only; tests use :class:`RecorderProcess` (child process, stopped by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import pfx

MAX_NETSTRING = 100_000  # Postfix's own limit on socketmap replies; bound requests the same


def netstring(payload: str) -> bytes:
    data = payload.encode()
    return str(len(data)).encode() + b":" + data + b","


async def read_netstring(reader: asyncio.StreamReader) -> str | None:
    try:
        head = await reader.readuntil(b":")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    except asyncio.LimitOverrunError:
        raise ValueError("netstring length too long")
    length = int(head[:-1])
    if length > MAX_NETSTRING:
        raise ValueError(f"netstring of {length} bytes exceeds {MAX_NETSTRING}")
    body = await reader.readexactly(length + 1)
    if body[-1:] != b",":
        raise ValueError("netstring missing trailing comma")
    return body[:-1].decode("utf-8", "surrogateescape")


class Recorder:
    def __init__(self, record_file: str, rules: dict[str, list[list[str]]]):
        self.out = open(record_file, "a", buffering=1)
        self.rules = {name: [(re.compile(rx), reply) for rx, reply in pairs] for name, pairs in rules.items()}
        self.count = 0

    def answer(self, name: str, key: str) -> str:
        for rx, reply in self.rules.get(name, []):
            if rx.search(key):
                return reply
        return "NOTFOUND "

    async def serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer_pid = None
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            peer_pid = struct.unpack("3i", creds)[0]
        peer = writer.get_extra_info("peername")
        try:
            while True:
                request = await read_netstring(reader)
                if request is None:
                    break
                name, _, key = request.partition(" ")
                reply = self.answer(name, key)
                self.count += 1
                self.out.write(json.dumps({
                    "t": time.time(), "n": self.count, "name": name, "key": key, "reply": reply,
                    "peer_pid": peer_pid, "peer": peer if isinstance(peer, (list, tuple)) else None,
                }) + "\n")
                if reply == "@hang":
                    await asyncio.sleep(3600)
                writer.write(netstring(reply))
                await writer.drain()
        except (ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def serve(self, addrs: list[str], ready_out) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        servers, bound = [], []
        for addr in addrs:
            if addr.startswith("unix:"):
                path = addr[5:]
                if os.path.exists(path):
                    os.unlink(path)
                server = await asyncio.start_unix_server(self.serve_conn, path)
                os.chmod(path, 0o666)  # smtp runs as the postfix user
                bound.append(addr)
            else:
                host, _, port = addr.rpartition(":")
                server = await asyncio.start_server(self.serve_conn, host, int(port), reuse_address=True)
                h, p = server.sockets[0].getsockname()[:2]
                bound.append(f"inet:{h}:{p}")
            servers.append(server)
        ready_out.write(json.dumps({"ready": True, "pid": os.getpid(), "addrs": bound}) + "\n")
        ready_out.flush()
        await stop.wait()
        for server in servers:
            server.close()
        self.out.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", action="append", required=True, metavar="HOST:PORT|unix:/PATH")
    ap.add_argument("--record", required=True, metavar="FILE", help="JSON lines, one per query")
    ap.add_argument("--rules", metavar="JSON", default="{}", help='{"name": [["regex", "OK value"], ...]}')
    args = ap.parse_args(argv)
    asyncio.run(Recorder(args.record, json.loads(args.rules)).serve(args.listen, sys.stdout))
    return 0


class RecorderProcess:
    """The recorder as a child process; ``queries()`` reads what it recorded."""

    def __init__(self, listen: list[str], record_file: str, rules: dict[str, Any] | None = None):
        self.listen = listen
        self.record_file = record_file
        self.rules = rules or {}
        self.proc: subprocess.Popen | None = None
        self.addrs: list[str] = []

    def start(self, timeout: float = 10.0) -> "RecorderProcess":
        cmd = [sys.executable, os.path.abspath(__file__), "--record", self.record_file, "--rules", json.dumps(self.rules)]
        for addr in self.listen:
            cmd += ["--listen", addr]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise RuntimeError("socketmap recorder did not start")
        self.addrs = json.loads(line)["addrs"]
        return self

    def queries(self, name: str | None = None) -> list[dict[str, Any]]:
        if not os.path.exists(self.record_file):
            return []
        with open(self.record_file) as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
        return [r for r in rows if name is None or r["name"] == name]

    def stop(self) -> None:
        if self.proc is None:
            return
        pfx.stop_process(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> "RecorderProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
