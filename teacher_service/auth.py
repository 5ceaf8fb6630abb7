"""Optional TLS and bearer-token authentication, the same for both front ends.

TLS: the server presents `cert`/`key` (PEM) on gRPC and HTTP; with `client_ca` it also
requires client certificates signed by that CA (mutual TLS). Clients verify the server
against `ca` (or the system roots) and present their own certificate for mutual TLS.

With a token configured, every gRPC call must carry the metadata `authorization: Bearer
<token>` and every HTTP request the header `Authorization: Bearer <token>`; anything else
is refused (UNAUTHENTICATED / 401) before it is parsed or queued, so it never reaches the
batcher. Health checks stay open: Kubernetes probes and Docker's HEALTHCHECK send no
credentials. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
import ssl
from pathlib import Path

import grpc

from teacher_client.auth import TOKEN_ENV, read_pem

GRPC_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
HTTP_OPEN_PATHS = frozenset({"/health"})
REFUSED = "missing or invalid bearer token (send 'authorization: Bearer <token>')"


def read_token(path: str | Path | None) -> str:
    """The token from a file (whitespace stripped), else $TEACHER_AUTH_TOKEN, else ""."""
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"auth token file {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "")


def bearer_matches(header: str | None, token: str) -> bool:
    scheme, _, value = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode(), token.encode()
    )


async def _refuse(request, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless it carries the bearer token."""

    def __init__(self, token: str) -> None:
        self._token = token
        self._refusal = grpc.unary_unary_rpc_method_handler(_refuse)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(GRPC_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_matches(metadata.get("authorization"), self._token):
            return await continuation(handler_call_details)
        return self._refusal


def grpc_server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(read_pem(key), read_pem(cert))],
        root_certificates=read_pem(client_ca),
        require_client_auth=bool(client_ca),
    )


def uvicorn_tls_options(cert: str, key: str, client_ca: str = "") -> dict:
    """uvicorn.Config keywords for the same certificate (and client CA) as gRPC."""
    if not cert:
        return {}
    options = {"ssl_certfile": cert, "ssl_keyfile": key}
    if client_ca:
        options.update(ssl_ca_certs=client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
