"""Optional API-key check of the task routes, shared by HTTP (X-API-Key / Bearer) and gRPC (x-api-key metadata)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from serving.errors import Unauthorized


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a caller sent: `x-api-key`, else `authorization: Bearer <key>` (names lower-case)."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def check_api_key(allowed: Iterable[str], presented: str | None) -> None:
    """Pass when no keys are configured or `presented` is one of them (constant-time compare).

    Raises:
        Unauthorized: keys are configured and the caller sent none or a wrong one (HTTP 401).
    """
    keys = [k for k in allowed if k]
    if not keys:
        return
    if presented is None:
        raise Unauthorized("this API needs a key: send it as `X-API-Key: <key>` or `Authorization: Bearer <key>`")
    if not any(hmac.compare_digest(presented.encode(), k.encode()) for k in keys):
        raise Unauthorized("the API key is not valid: check it, or ask the operator for one")
