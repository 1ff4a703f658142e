#!/usr/bin/env python3
"""Do-nothing policy server: answers every request `action=DUNNO`, reads nothing else.

The machine's ceiling for the policy benchmark: what the load generator reaches when
the server does no work at all. Requests are counted by their ending empty line, so
pipelined requests are answered in one write.

usage: baseline.py HOST PORT  (prints `listening on HOST:PORT` once bound)
"""
import asyncio
import sys

ANSWER = b"action=DUNNO\n\n"


class Dunno(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.last = b""  # last byte of the previous chunk, for a "\n\n" split across reads

    def data_received(self, data):
        data = self.last + data
        n = data.count(b"\n\n")
        self.last = data[-1:]
        if self.last == b"\n" and data.endswith(b"\n\n"):
            self.last = b""  # this blank line is counted; it must not pair with the next chunk
        if n:
            self.transport.write(ANSWER * n)


async def main(host, port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Dunno, host, port, reuse_address=True)
    addr = server.sockets[0].getsockname()
    print(f"listening on {addr[0]}:{addr[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
