"""Errors with a reason: every refusal a node sends is one of these, with an errno-style code."""
from __future__ import annotations

from typing import Any


class GvtError(Exception):
    """An operation refused for a reason; `code` is an errno name (EINVAL, ENOSPC, EFAULT...)."""

    def __init__(self, code: str, text: str):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


def need(payload: Any, key: str, typ: type | tuple[type, ...], what: str = "payload") -> Any:
    """Fetch payload[key], refusing a missing field or a wrong type with a clear EINVAL."""
    if not isinstance(payload, dict):
        raise GvtError("EINVAL", f"{what} must be a map, got {type(payload).__name__}")
    try:
        value = payload[key]
    except KeyError:
        raise GvtError("EINVAL", f"{what} lacks field {key!r}") from None
    # bool is an int subclass; a wire bool where a number is expected is a peer bug
    if not isinstance(value, typ) or (isinstance(value, bool) and typ in (int, (int,))):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise GvtError("EINVAL", f"{what} field {key!r} must be {names}, got {type(value).__name__}")
    return value
