"""Who may call ``llmray serve``: loopback by default; a bearer token when configured, and always off loopback.

Why this shape:

* The HTTP proxy binds 127.0.0.1 unless told otherwise. Binding any other address without a
  token is refused before anything starts: whoever reaches the port could use the model (and
  its compute) otherwise. A token too short to resist guessing is refused as well.
* When a token is configured, every request needs ``Authorization: Bearer <token>``; the check
  runs before the body is read, so an unauthenticated caller learns nothing from validation errors.
* Only the token's SHA-256 goes to the replicas (Ray keeps deployment arguments in its control
  store); a presented token is hashed and compared to it in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

DEFAULT_TOKEN_ENV = "LLMRAY_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16


class ServeSecurityError(ValueError):
    """A serving setup that would expose the model unprotected; the message says how to fix it."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_exposure(host: str, token: str | None, token_env: str = DEFAULT_TOKEN_ENV) -> None:
    """Refuse a non-loopback bind without a token, and any token shorter than MIN_TOKEN_LENGTH."""
    if not token and not is_loopback(host):
        raise ServeSecurityError(
            f"refusing to serve on {host!r} without a bearer token: anyone who can reach it could use the "
            f"model. Put a token in the environment variable {token_env} (choose another variable with "
            "--token-env), or bind 127.0.0.1.")
    if token and len(token) < MIN_TOKEN_LENGTH:
        raise ServeSecurityError(
            f"the bearer token in {token_env} has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


def token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


class BearerAuth:
    """Checks ``Authorization`` headers against a token's digest; with no digest everyone is allowed."""

    def __init__(self, digest: str | None) -> None:
        self._digest = digest

    def allows(self, authorization: str | None) -> bool:
        if self._digest is None:
            return True
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return False
        return hmac.compare_digest(token_digest(credentials.strip()), self._digest)
