"""A small HTTP(S) server for the http plugin's tests and the bench's source suite: aiohttp's
file serving, which answers HEAD and byte ranges as web servers do, plus the odd behaviours an
image server may have.

    python bench/http_server.py DIR [--port N] [--tls PKI_DIR]

Prints the port once it listens (`HttpServer` below starts it so and stops it). Routes (NAME: a
file in DIR):
- /files/NAME: the file, with ranges;
- /redirect/NAME: 302 to /files/NAME;
- /auth/NAME: the file, for basic auth user "u", password "p" only (else 401);
- /headers/NAME: the file, for requests with the headers "X-One: 1" and "X-Two: 2" only (else 403);
- /whole/NAME: always the whole file with 200 (a server that ignores Range);
- /shifted/NAME: 206 answers for the asked range moved 512 bytes on (a broken server);
- /stall/NAME: the file, except that a range past byte 0 gets headers and then nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import re
import ssl
import subprocess
import sys
from pathlib import Path

from aiohttp import web


class HttpServer:
    """This server in a child process, serving `root` (over TLS with `tls`: a directory with
    server-cert.pem and server-key.pem); `url(route, name)` for its files."""

    def __init__(self, root: Path, tls: Path | None = None, port: int = 0) -> None:
        self.root, self.tls = root, tls
        cmd = [sys.executable, __file__, str(root), "--port", str(port)]
        if tls is not None:
            cmd += ["--tls", str(tls)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        scheme = "https" if tls else "http"
        host = "localhost" if tls else "127.0.0.1"  # the test certificate names localhost
        self.base = f"{scheme}://{host}:{self.port}"

    def url(self, route: str, name: str = "disk.img") -> str:
        return f"{self.base}/{route}/{name}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls", type=Path)
    args = ap.parse_args()
    root: Path = args.dir

    def path_of(request: web.Request) -> Path:
        path = root / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def files(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path_of(request))

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"/files/{request.match_info['name']}")

    async def auth(request: web.Request) -> web.StreamResponse:
        expected = "Basic " + base64.b64encode(b"u:p").decode()
        if request.headers.get("Authorization") != expected:
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Basic realm="t"'})
        return web.FileResponse(path_of(request))

    async def headers(request: web.Request) -> web.StreamResponse:
        if request.headers.get("X-One") != "1" or request.headers.get("X-Two") != "2":
            raise web.HTTPForbidden()
        return web.FileResponse(path_of(request))

    async def whole(request: web.Request) -> web.StreamResponse:
        return web.Response(body=path_of(request).read_bytes())

    async def shifted(request: web.Request) -> web.StreamResponse:
        data = path_of(request).read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        if m is None:
            return web.Response(body=data)
        first, last = int(m.group(1)) + 512, int(m.group(2)) + 512
        return web.Response(
            status=206,
            body=data[first : last + 1],
            headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"},
        )

    async def stall(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Range", "bytes=0-").startswith("bytes=0-"):
            return web.FileResponse(path_of(request))
        response = web.StreamResponse(status=206)
        response.content_length = 4096
        await response.prepare(request)
        await asyncio.Event().wait()  # never a byte of the body
        return response

    app = web.Application()
    app.router.add_route("*", "/files/{name}", files)
    app.router.add_route("*", "/redirect/{name}", redirect)
    app.router.add_route("*", "/auth/{name}", auth)
    app.router.add_route("*", "/headers/{name}", headers)
    app.router.add_route("*", "/whole/{name}", whole)
    app.router.add_route("*", "/shifted/{name}", shifted)
    app.router.add_route("*", "/stall/{name}", stall)

    context = None
    if args.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls / "server-cert.pem", args.tls / "server-key.pem")

    async def serve() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        print(port, flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
