"""A local S3 endpoint for tests and benchmarks: moto's server over HTTP on 127.0.0.1, and a fault-injecting
proxy in front of it or of SeaweedFS (seiscli.data.seaweed): latency per request, 503 SlowDown for a fraction
of GETs, dropped connections.

Nothing here patches a client: the code under test talks real HTTP to a real S3 implementation.

    python -m seiscli.data.s3local moto --port 0
    python -m seiscli.data.s3local proxy --upstream http://127.0.0.1:PORT --latency-ms 30 --slowdown 0.05

Both print `READY <endpoint>` on stdout once they serve.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any

SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
# Host is forwarded as the client sent it: SigV4 signs it, and a server that checks signatures (SeaweedFS, AWS)
# answers 403 to a request whose Host the proxy changed.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


class MotoS3:
    """moto's S3 in this process (threads), on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
        self._server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        self._server.stop()


@dataclass
class Faults:
    """What the proxy does to requests; may be changed while it runs."""

    latency_s: float = 0.0  # added to every request before it is forwarded
    slowdown: float = 0.0  # fraction of matching GETs answered 503 SlowDown
    reset: float = 0.0  # fraction of matching GETs whose connection is dropped without an answer
    match: str = ""  # only GETs whose path contains this are failed ("" = all)
    seed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"requests": 0, "slowdown": 0, "reset": 0})


class FaultProxy:
    """An HTTP proxy to `upstream` on 127.0.0.1 (aiohttp, its own thread and event loop)."""

    def __init__(self, upstream: str, faults: Faults | None = None, *, port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults or Faults()
        self._rng = random.Random(self.faults.seed)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = port
        self.endpoint = ""
        self._thread = threading.Thread(target=self._run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the S3 fault proxy did not start in 30 s")

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        import aiohttp
        from aiohttp import web

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app = web.Application(client_max_size=1 << 31)

            async def handler(request: Any) -> Any:
                return await self._handle(request, session)

            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self._port)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.endpoint = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    async def _handle(self, request: Any, session: Any) -> Any:
        from aiohttp import web
        from yarl import URL

        f = self.faults
        f.counts["requests"] += 1
        body = await request.read()
        if f.latency_s:
            await asyncio.sleep(f.latency_s)
        if request.method == "GET" and f.match in request.path:
            roll = self._rng.random()
            if roll < f.slowdown:
                f.counts["slowdown"] += 1
                return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
            if roll < f.slowdown + f.reset:
                f.counts["reset"] += 1
                request.transport.abort()  # the client sees the connection die mid-request
                return web.Response(status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        url = URL(self.upstream + request.raw_path, encoded=True)
        # no body, no data: aiohttp would add Content-Type and Content-Length: 0 that the client did not send
        data = body or None
        async with session.request(request.method, url, headers=headers, data=data, allow_redirects=False) as r:
            payload = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in HOP_BY_HOP}
            if request.method == "HEAD":
                out["Content-Length"] = r.headers.get("Content-Length", "0")
                return web.Response(status=r.status, headers=out)
            return web.Response(status=r.status, body=payload, headers=out)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m seiscli.data.s3local")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("moto", help="moto's S3 server on 127.0.0.1")
    px = sub.add_parser("proxy", help="fault-injecting proxy to an S3 endpoint")
    px.add_argument("--upstream", required=True)
    px.add_argument("--latency-ms", type=float, default=0.0)
    px.add_argument("--slowdown", type=float, default=0.0)
    px.add_argument("--reset", type=float, default=0.0)
    px.add_argument("--match", default="")
    args = ap.parse_args(argv)
    if args.what == "moto":
        server: MotoS3 | FaultProxy = MotoS3()
    else:
        faults = Faults(latency_s=args.latency_ms / 1000, slowdown=args.slowdown, reset=args.reset, match=args.match)
        server = FaultProxy(args.upstream, faults)
    print(f"READY {server.endpoint}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
