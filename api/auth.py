"""Bearer-token authentication with two roles: operator (write) and reader.

API.md: write endpoints need an operator token, always; read endpoints need a
reader or operator token when reader tokens are configured and are open
otherwise. Tokens are compared in constant time (:func:`hmac.compare_digest`)
against every configured token, so the time taken does not reveal which
token, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from fastapi import Request
from fastapi.security import HTTPBearer


class Role(StrEnum):
    """What a token may do."""

    READER = "reader"
    OPERATOR = "operator"


class Unauthorized(PermissionError):
    """No credentials, or credentials that match no token (HTTP 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


class Forbidden(PermissionError):
    """Valid credentials without the role the endpoint needs (HTTP 403)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role and a stable, non-secret name for the audit log."""

    role: Role | None
    name: str

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR


ANONYMOUS = Principal(None, "anonymous")


def _matches(token: bytes, candidates: Sequence[str]) -> bool:
    """True if ``token`` equals one of ``candidates``; compares against all of them."""
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token, candidate.encode("utf-8"))
    return found


class TokenAuth:
    """Resolves the ``Authorization`` header of a request to a :class:`Principal`.

    Parameters
    ----------
    operator_tokens, reader_tokens : sequence of str
        The configured tokens of each role.
    """

    #: Declares the scheme in the OpenAPI document ("Authorize" button).
    scheme = HTTPBearer(auto_error=False, description="Operator or reader token")

    def __init__(self, operator_tokens: Sequence[str], reader_tokens: Sequence[str]) -> None:
        self.operator_tokens = tuple(operator_tokens)
        self.reader_tokens = tuple(reader_tokens)

    def identify(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value (anonymous when absent).

        Raises
        ------
        Unauthorized
            The header is malformed or the token matches no configured token.
        """
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        raw = token.encode("utf-8", "surrogateescape")
        name = "token:" + hashlib.sha256(raw).hexdigest()[:12]
        is_operator = _matches(raw, self.operator_tokens)
        is_reader = _matches(raw, self.reader_tokens)
        if is_operator:
            return Principal(Role.OPERATOR, "operator " + name)
        if is_reader:
            return Principal(Role.READER, "reader " + name)
        raise Unauthorized("invalid bearer token")

    def reader(self, request: Request) -> Principal:
        """Check access to a read endpoint."""
        principal = self.identify(request.headers.get("authorization"))
        if principal.role is None and self.reader_tokens:
            raise Unauthorized("this endpoint needs a reader or operator bearer token")
        return principal

    def operator(self, request: Request) -> Principal:
        """Check access to a write endpoint."""
        principal = self.identify(request.headers.get("authorization"))
        if principal.role is None:
            if not self.operator_tokens:
                raise Forbidden("write endpoints are disabled: no operator token is configured "
                                "(set SITIANCAL_OPERATOR_TOKENS or start with `sitiancal serve`)")
            raise Unauthorized("this endpoint needs an operator bearer token")
        if principal.role is not Role.OPERATOR:
            raise Forbidden("this endpoint needs an operator token; a reader token was given")
        return principal


class WriteRateLimit:
    """Token buckets of write requests, one per caller.

    Each caller (operator token) may make ``burst`` write requests at once and
    ``rate`` per second on average; beyond that :meth:`acquire` returns the
    seconds to wait (the ``Retry-After`` of a ``429``).

    Parameters
    ----------
    rate : float
        Sustained write requests per second per caller.
    burst : int
        Requests a caller may make at once after being idle.
    """

    def __init__(self, rate: float = 10.0, burst: int = 60) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, caller: str, now: float | None = None) -> float:
        """Take one request from ``caller``'s bucket: 0 if allowed, else seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(caller, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            if len(self._buckets) > 10000:  # forget idle callers (full buckets)
                self._buckets = {k: v for k, v in self._buckets.items()
                                 if v[0] + (now - v[1]) * self.rate < self.burst}
            return (1.0 - tokens) / self.rate


#: Methods that change state: they need an operator token on every /v1 path.
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class OperatorGuard:
    """ASGI middleware: every write request under ``/v1`` needs an operator token.

    The routes check it too (and get the caller's name for the audit log);
    this guard makes the rule hold before a request body is read or parsed,
    and for any write route added later. With a :class:`WriteRateLimit`, a
    caller beyond its rate gets ``429`` with ``Retry-After`` (seconds).
    """

    def __init__(self, app, auth: TokenAuth, limit: WriteRateLimit | None = None) -> None:
        self.app = app
        self.auth = auth
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["method"] in WRITE_METHODS
                and scope["path"].startswith("/v1/")):
            from starlette.requests import Request
            from starlette.responses import JSONResponse

            try:
                principal = self.auth.operator(Request(scope))
            except (Unauthorized, Forbidden) as exc:
                status = 401 if isinstance(exc, Unauthorized) else 403
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                response = JSONResponse({"detail": str(exc)}, status_code=status,
                                        headers=headers)
                await response(scope, receive, send)
                return
            wait = self.limit.acquire(principal.name) if self.limit is not None else 0.0
            if wait > 0:
                response = JSONResponse(
                    {"detail": f"too many write requests from {principal.name}: at most "
                     f"{self.limit.rate:g}/s (burst {self.limit.burst}); retry in "
                     f"{math.ceil(wait)} s"},
                    status_code=429, headers={"Retry-After": str(math.ceil(wait))})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
