"""How fast a server that waits in one way or another is woken by its client: a two-process
ping-pong over a unix socket (a 28-byte request, a 4112-byte reply, as a 4K NBD read), the
client always blocked in `recv`, the server waiting in blocking `recv`, `MSG_PEEK`, `select`,
`poll`, `epoll` or a uvloop protocol. See bench/RESULTS.md ("QD1: where the rest of the latency
goes").

    .venv/bin/python -m bench.wakeup [--server-cpu 1 --client-cpu 0] [--rounds 20000]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import tempfile
import time
from collections.abc import Callable

REQUEST, REPLY = 28, 4096 + 16


def _blocking(c: socket.socket) -> None:
    reply = bytes(REPLY)
    while c.recv(REQUEST):
        c.sendall(reply)


def _peek(c: socket.socket) -> None:
    reply = bytes(REPLY)
    while c.recv(REQUEST, socket.MSG_PEEK):
        c.recv(REQUEST)
        c.sendall(reply)


def _waiting(wait: Callable[[], object]) -> Callable[[socket.socket], None]:
    def serve(c: socket.socket) -> None:
        reply = bytes(REPLY)
        c.setblocking(False)
        while True:
            wait()
            if not c.recv(REQUEST):
                return
            c.send(reply)

    return serve


def _select(c: socket.socket) -> None:
    _waiting(lambda: select.select([c], [], []))(c)


def _poll(c: socket.socket) -> None:
    p = select.poll()
    p.register(c.fileno(), select.POLLIN)
    _waiting(p.poll)(c)


def _epoll(c: socket.socket) -> None:
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN)
    _waiting(ep.poll)(c)


def _uvloop(c: socket.socket) -> None:
    import asyncio

    import uvloop

    reply = bytes(REPLY)
    loop = uvloop.new_event_loop()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(reply)  # type: ignore[attr-defined]

        def connection_lost(self, exc: Exception | None) -> None:
            loop.stop()

    loop.run_until_complete(loop.connect_accepted_socket(Server, c))
    loop.run_forever()


SERVERS = {"recv": _blocking, "peek": _peek, "select": _select, "poll": _poll,
           "epoll": _epoll, "uvloop": _uvloop}  # fmt: skip


def round_trip_us(way: str, rounds: int, server_cpu: int | None, client_cpu: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen()
        pid = os.fork()
        if pid == 0:  # the server
            try:
                if server_cpu is not None:
                    os.sched_setaffinity(0, {server_cpu})
                conn, _ = listener.accept()
                SERVERS[way](conn)
            finally:
                os._exit(0)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        view = memoryview(bytearray(REPLY))
        request = bytes(REQUEST)

        def once() -> None:
            client.sendall(request)
            got = 0
            while got < REPLY:
                got += client.recv_into(view[got:])

        for _ in range(rounds // 10):  # warm up
            once()
        start = time.perf_counter()
        for _ in range(rounds):
            once()
        elapsed = time.perf_counter() - start
        client.close()
        os.waitpid(pid, 0)
        return elapsed / rounds * 1e6


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.wakeup", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=20000)
    p.add_argument("--server-cpu", type=int)
    p.add_argument("--client-cpu", type=int)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("ways", nargs="*", metavar="WAY", help=f"of: {', '.join(SERVERS)} (all)")
    args = p.parse_args()
    unknown = set(args.ways) - set(SERVERS)
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))} (ways: {', '.join(SERVERS)})")
    for way in args.ways or SERVERS:
        times = [round_trip_us(way, args.rounds, args.server_cpu, args.client_cpu)
                 for _ in range(args.repeat)]  # fmt: skip
        print(f"{way:7} " + " ".join(f"{t:5.1f}" for t in times) + " µs per round trip")


if __name__ == "__main__":
    main()
