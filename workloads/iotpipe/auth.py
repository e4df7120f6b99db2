"""Device and client-app credentials: HS256 JWTs (PyJWT) signed with one shared secret.

A token binds an identity (``sub``: the device id or the client-app id) to an audience
(``iotpipe-device`` for devices talking to ingest, ``iotpipe-client`` for apps talking to
the relay) and an expiry (``exp``). Ingest and relay pods verify tokens locally with the
shared secret, so no database sits on the connection path.

The secret comes from ``IOTPIPE_AUTH_SECRET`` (the secret itself) or
``IOTPIPE_AUTH_SECRET_FILE`` (a path, e.g. a mounted Kubernetes Secret; surrounding
whitespace is stripped). ``iotpipe token DEVICE_ID`` prints a token.

Every issued token carries a random token id (``jti``), so one token can be revoked
through the deny list (``iotpipe.denylist``) without rotating the secret;
``iotpipe token --json`` prints it next to the token.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from pydantic import Field
from pydantic_settings import CliPositionalArg

from iotpipe.settings import TierSettings, parse_settings, tier_config

__all__ = [
    "AUTH_REASONS",
    "CLIENT_AUDIENCE",
    "DEVICE_AUDIENCE",
    "AuthError",
    "Identity",
    "issue_token",
    "load_secret",
    "token_main",
    "verify_identity",
    "verify_token",
]

DEVICE_AUDIENCE = "iotpipe-device"
CLIENT_AUDIENCE = "iotpipe-client"
SECRET_ENV = "IOTPIPE_AUTH_SECRET"
SECRET_FILE_ENV = "IOTPIPE_AUTH_SECRET_FILE"
ALGORITHM = "HS256"
# Identities are used as ZeroMQ topics and storage keys: keep them short and printable.
MAX_SUBJECT_LEN = 128
MAX_TOKEN_ID_LEN = 256

AUTH_REASONS = ("missing", "malformed", "bad_signature", "expired", "wrong_audience",
                "revoked")


@dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for: ``subject`` (``sub``) and its token id (``jti``,
    None for tokens issued without one)."""

    subject: str
    token_id: str | None


class AuthError(Exception):
    """A credential was refused; ``reason`` is one of ``AUTH_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_secret(environ: dict[str, str] | None = None) -> bytes:
    """The shared signing secret from ``IOTPIPE_AUTH_SECRET`` or ``IOTPIPE_AUTH_SECRET_FILE``.

    Raises ``RuntimeError`` naming both variables when neither is set, the file cannot be
    read, or the secret is empty.
    """
    env = os.environ if environ is None else environ
    value = env.get(SECRET_ENV)
    if value:
        return value.encode()
    path = env.get(SECRET_FILE_ENV)
    if path:
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as exc:
            raise RuntimeError(
                f"{SECRET_FILE_ENV}={path}: cannot read the secret ({exc})"
            ) from None
        if not secret:
            raise RuntimeError(f"{SECRET_FILE_ENV}={path}: the file is empty")
        return secret
    raise RuntimeError(
        f"no auth secret: set {SECRET_ENV} (the secret) or {SECRET_FILE_ENV} (a file holding it)"
    )


def token_claims(subject: str, audience: str, ttl_s: int, token_id: str | None = None
                 ) -> dict[str, str | int]:
    """The claims ``issue_token`` signs; a random 128-bit ``jti`` unless one is given."""
    if not subject or len(subject) > MAX_SUBJECT_LEN:
        raise ValueError(f"subject must be 1..{MAX_SUBJECT_LEN} characters")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be > 0")
    if token_id is not None and not 0 < len(token_id) <= MAX_TOKEN_ID_LEN:
        raise ValueError(f"token id must be 1..{MAX_TOKEN_ID_LEN} characters")
    now = int(time.time())
    return {"sub": subject, "aud": audience, "iat": now, "exp": now + int(ttl_s),
            "jti": token_id or secrets.token_hex(16)}


def issue_token(secret: bytes, subject: str, audience: str, ttl_s: int,
                token_id: str | None = None) -> str:
    """A signed HS256 token for ``subject`` valid for ``ttl_s`` seconds, with a ``jti``."""
    return jwt.encode(token_claims(subject, audience, ttl_s, token_id), secret,
                      algorithm=ALGORITHM)


def verify_token(secret: bytes, token: str, audience: str) -> str:
    """The subject of a valid token; ``AuthError`` with the reason otherwise."""
    return verify_identity(secret, token, audience).subject


def verify_identity(secret: bytes, token: str, audience: str) -> Identity:
    """Subject and token id of a valid token; ``AuthError`` with the reason otherwise."""
    if not token:
        raise AuthError("missing", "no token")
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], audience=audience,
            options={"require": ["sub", "aud", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("expired", "token has expired") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad_signature", "signature does not match") from None
    except jwt.InvalidAudienceError:
        raise AuthError("wrong_audience", f"token is not for {audience}") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError("malformed", f"only {ALGORITHM} tokens are accepted") from None
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError("malformed", f"missing claim {exc.claim}") from None
    except jwt.InvalidTokenError as exc:  # DecodeError, ImmatureSignature, bad claim types
        raise AuthError("malformed", str(exc)) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or len(subject) > MAX_SUBJECT_LEN:
        raise AuthError("malformed", f"'sub' must be a string of 1..{MAX_SUBJECT_LEN} characters")
    token_id = claims.get("jti")
    if token_id is not None and (not isinstance(token_id, str)
                                 or not 0 < len(token_id) <= MAX_TOKEN_ID_LEN):
        raise AuthError("malformed", f"'jti' must be a string of 1..{MAX_TOKEN_ID_LEN} "
                                     "characters")
    return Identity(subject, token_id)


def bearer_token(authorization: str | None) -> str:
    """The token from an ``Authorization: Bearer <token>`` header value."""
    if not authorization:
        raise AuthError("missing", "no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("malformed", "expected 'Authorization: Bearer <token>'")
    return token.strip()


class TokenSettings(TierSettings):
    """Print a signed token for a device (or, with --client, a client app)."""

    model_config = tier_config("iotpipe token", "IOTPIPE_TOKEN_")

    subject: CliPositionalArg[str] = Field(description="device id (or client-app id)")
    client: bool = Field(
        False, description="issue a client-app token (relay) instead of a device token"
    )
    ttl: int = Field(86400, gt=0, description="validity in seconds")
    json_output: bool = Field(False, alias="json",
                              description="print a JSON object with the token and its claims "
                                          "(the jti is what the deny list's token_ids take)")


def token_main(argv: Sequence[str]) -> int:
    """``iotpipe token DEVICE_ID [--client] [--ttl SECONDS] [--json]``."""
    settings = parse_settings(TokenSettings, argv)
    try:
        secret = load_secret()
        claims = token_claims(
            settings.subject, CLIENT_AUDIENCE if settings.client else DEVICE_AUDIENCE,
            settings.ttl,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"iotpipe token: error: {exc}", file=sys.stderr)
        return 2
    token = jwt.encode(claims, secret, algorithm=ALGORITHM)
    print(json.dumps({"token": token, **claims}) if settings.json_output else token)
    return 0
