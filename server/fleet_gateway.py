"""The SuperLink's door to the network: the Fleet API only, over TLS.

Flower 1.42 serves its Fleet API (what SuperNodes call), its Control API (what ``flwr run``,
``flwr supernode register`` and ``flwr stop`` call) and its Runtime API on one HTTPS port, and
without an enterprise OIDC plugin the Control API has no login: whoever reaches that port can
register node keys, start runs with any configuration and ship app code that every SuperNode
runs. (``--control-api-address`` is deprecated in 1.42 and no longer separates the two.)

So the SuperLink listens on loopback only, and this gateway listens on the network address
with the SuperLink's TLS certificate and forwards exactly the Fleet API (``POST /v1/fleet/*``)
to it, over TLS checked against the local CA. Every other path gets ``404`` without reaching
the SuperLink. SuperNode authentication is unchanged: the node's signed headers pass through
and the SuperLink checks them.

    fedrank gateway --certs certs --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093

The operator runs ``flwr`` on the server itself (or through an SSH tunnel to its loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fedrank.common.errors import ConfigError

__all__ = ["FLEET_PREFIX", "make_app", "parse_address", "main"]

FLEET_PREFIX = "/v1/fleet/"
# RFC 9110 7.6.1: connection-specific headers are never forwarded
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# a SuperNode's long pulls and large object transfers must not be cut by the gateway
_UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0)


def parse_address(text: str, option: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); ConfigError naming ``option``."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{option} must be HOST:PORT (e.g. 127.0.0.1:9093), got {text!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(upstream: str, ca_file: Path) -> Starlette:
    """The gateway's ASGI app: ``POST /v1/fleet/*`` forwarded to ``upstream`` (``HOST:PORT``,
    HTTPS checked against ``ca_file``), ``404`` for everything else."""
    context = ssl.create_default_context(cafile=str(ca_file))
    client = httpx.AsyncClient(
        base_url=f"https://{upstream}", verify=context, timeout=_UPSTREAM_TIMEOUT
    )

    async def fleet(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        if request.client is not None:
            headers.append(("x-forwarded-for", request.client.host))
        outgoing = client.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        try:
            reply = await client.send(outgoing, stream=True)
        except httpx.HTTPError as err:
            return PlainTextResponse(
                f"fedrank gateway: the SuperLink at {upstream} is unreachable "
                f"({type(err).__name__})\n",
                status_code=502,
            )
        back = {k: v for k, v in reply.headers.items() if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(
            reply.aiter_raw(),
            status_code=reply.status_code,
            headers=back,
            background=BackgroundTask(reply.aclose),
        )

    async def refuse(request: Request) -> Response:
        return PlainTextResponse(
            f"fedrank gateway: {request.url.path} is not served on this address; it serves "
            "only the Fleet API for SuperNodes\n",
            status_code=404,
        )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(
        routes=[
            Route(FLEET_PREFIX + "{rest:path}", fleet, methods=["POST"]),
            Route("/{anything:path}", refuse, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ],
        lifespan=lifespan,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedrank gateway",
        description="Expose only the SuperLink's Fleet API (for SuperNodes) on the network.",
    )
    parser.add_argument(
        "--certs",
        required=True,
        help="folder written by `fedrank certs` (ca.crt, server.pem, server.key)",
    )
    parser.add_argument(
        "--listen", default="0.0.0.0:9092", help="network address for SuperNodes (HOST:PORT)"
    )
    parser.add_argument(
        "--superlink",
        default="127.0.0.1:9093",
        help="the SuperLink's loopback address (HOST:PORT, default 127.0.0.1:9093)",
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    host, port = parse_address(args.listen, "--listen")
    up_host, _ = parse_address(args.superlink, "--superlink")
    if not _is_loopback(up_host):
        raise ConfigError(
            f"--superlink {args.superlink}: the SuperLink must listen on loopback only "
            "(127.0.0.1, ::1 or localhost), or its Control API is on the network"
        )
    certs = Path(args.certs)
    files = {name: certs / name for name in ("ca.crt", "server.pem", "server.key")}
    for path in files.values():
        if not path.is_file():
            raise ConfigError(f"--certs {certs}: {path.name} is missing (run `fedrank certs`)")
    app = make_app(args.superlink, files["ca.crt"])
    print(
        f"fedrank gateway: Fleet API on https://{args.listen} -> https://{args.superlink} "
        "(every other path: 404)",
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=str(files["server.pem"]),
        ssl_keyfile=str(files["server.key"]),
        log_level="warning",
        access_log=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
