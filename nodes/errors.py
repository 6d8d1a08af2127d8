"""Errors with a reason. Every refusal a node makes or meets is a GvtError with an errno-style
code, so one `except GvtError` catches a local refusal, a peer's ERROR reply and a timeout."""
from __future__ import annotations

import errno

# The codes a node may send in an ERROR reply or count in a metric label: errno names.
KNOWN_CODES = frozenset(errno.errorcode.values())


class GvtError(Exception):
    """An operation refused for a reason; `code` is an errno name (EINVAL, ENOSPC, EFAULT...)."""

    def __init__(self, code: str, text: str):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class RemoteError(GvtError):
    """A peer answered a request with an ERROR."""

    def __init__(self, code: str, text: str, peer: str, kind: str):
        # a peer chooses its code: keep it only if it is an errno name (it may become a label)
        super().__init__(code if code in KNOWN_CODES else "EPROTO",
                         f"{peer} refused {kind}: {code}: {text}")
        self.peer, self.kind = peer, kind


class OutcomeUnknown(GvtError):
    """A request left but no answer will come: the peer may or may not have done it."""


class CallTimeout(OutcomeUnknown):
    """No reply within the call's timeout."""

    def __init__(self, peer: str, kind: str, timeout: float):
        super().__init__("ETIMEDOUT", f"{peer} did not answer {kind} within {timeout:g} s")
        self.peer, self.kind = peer, kind


class WireError(GvtError):
    """A frame that cannot be accepted; `seq` is the sender's sequence number, when it is known."""

    def __init__(self, code: str, text: str, seq: int = 0):
        super().__init__(code, text)
        self.seq = seq


def label_code(code: str) -> str:
    """A code fit for a metric label: an errno name, or EPROTO for anything else."""
    return code if code in KNOWN_CODES else "EPROTO"
