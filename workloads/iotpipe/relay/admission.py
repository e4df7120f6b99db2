"""Who may open the relay's live WebSocket: the handshake's sans-I/O verdict.

Re-exported by :mod:`iotpipe.relay.core`, the relay's one place of decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from iotpipe.auth import CLIENT_AUDIENCE, AuthError, bearer_token, verify_identity
from iotpipe.denylist import DenyList

__all__ = ["LIVE_PATH", "Admitted", "Refused", "admit"]

LIVE_PATH = "/v1/live"


@dataclass(frozen=True)
class Admitted:
    subject: str
    token_id: str | None


@dataclass(frozen=True)
class Refused:
    status: int  # the HTTP status of the handshake answer
    reason: str  # the rejected-connections metric label and the answer's first word
    detail: str


def admit(path: str, query: dict[str, list[str]], authorization: str | None,
          secret: bytes | None, deny: DenyList, clients: int, max_clients: int
          ) -> Admitted | Refused:
    """Whether a WebSocket handshake on ``path`` becomes a client, and who it is.

    ``secret`` None means no auth (the subject is ``?client=``). Browsers cannot set headers
    on a WebSocket, so a token may come as ``?token=`` instead of ``Authorization``.
    """
    if path != LIVE_PATH:
        return Refused(404, "not_found", f"the live endpoint is {LIVE_PATH}")
    if clients >= max_clients:
        return Refused(503, "too_many_clients", f"this relay serves at most {max_clients} clients")
    token_id: str | None = None
    if secret is None:
        subject = (query.get("client") or ["anonymous"])[0][:128]
    else:
        try:
            token = bearer_token(authorization) if authorization else \
                (query.get("token") or [""])[0]
            if not token:
                raise AuthError("missing", "no Authorization header or token parameter")
            identity = verify_identity(secret, token, CLIENT_AUDIENCE)
        except AuthError as exc:
            return Refused(401, exc.reason, exc.detail or exc.reason)
        subject, token_id = identity.subject, identity.token_id
    refusal = deny.refusal("client", subject, token_id)
    if refusal is not None:
        return Refused(403, "revoked", f"this {refusal} is on the deny list")
    return Admitted(subject, token_id)
