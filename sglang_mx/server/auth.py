"""Server-side bearer token check: a gRPC interceptor in front of every service but health."""

from __future__ import annotations

import hmac
from typing import Sequence

import grpc

from sglang_mx.auth import AUTH_METADATA_KEY

# Load balancers and orchestrators probe health without credentials.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def token_problem(metadata: Sequence[tuple[str, str | bytes]] | None, expected: bytes) -> str | None:
    """Why `metadata` does not carry the token `expected`, or None when it does.

    Accepts `authorization: Bearer <token>` (the scheme in any case). The token is
    compared in constant time.
    """
    values = [v for k, v in (metadata or ()) if k == AUTH_METADATA_KEY]
    if not values:
        return f"missing bearer token: send the metadata '{AUTH_METADATA_KEY}: Bearer <token>'"
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return f"malformed '{AUTH_METADATA_KEY}' metadata: expected 'Bearer <token>'"
    if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), expected):
        return "wrong bearer token"
    return None


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Answers UNAUTHENTICATED, before any handler runs, to calls without the shared token.

    Methods under OPEN_METHOD_PREFIXES (health) stay open.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("token is empty")
        self._expected = token.encode("utf-8")

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        problem = token_problem(handler_call_details.invocation_metadata, self._expected)
        if problem is None:
            return continuation(handler_call_details)
        message = f"{method.rsplit('/', 1)[-1]}: unauthenticated: {problem}"

        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny)
