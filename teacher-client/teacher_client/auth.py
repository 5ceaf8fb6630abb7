"""The client's side of authentication: a bearer token in the call metadata, and TLS.

The server refuses every call but health checks without `authorization: Bearer <token>`
when it is started with a token; with TLS the client verifies the server against a CA
(the system roots if none) and presents its own certificate for mutual TLS.
"""

from __future__ import annotations

from pathlib import Path

import grpc

TOKEN_ENV = "TEACHER_AUTH_TOKEN"  # where clients (and `--auth-token-file`'s default) look


def read_pem(path: str) -> bytes | None:
    """A PEM file's bytes (None for "": grpc then uses the system roots / no certificate)."""
    return Path(path).read_bytes() if path else None


def grpc_channel_credentials(
    ca: str = "", cert: str = "", key: str = ""
) -> grpc.ChannelCredentials:
    """Verify the server against `ca` (system roots if ""); present cert/key if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca), private_key=read_pem(key), certificate_chain=read_pem(cert)
    )


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata a client sends (None without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else None
