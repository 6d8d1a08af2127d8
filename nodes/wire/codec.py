"""Envelope codec.

A frame is a msgpack array:  [kind, seq, reply_to, vgpu, ts_ns, flags, payload]
- kind: message kind (a name from KINDS); replies are REPLY or ERROR
- seq: per link and direction, from 1
- reply_to: the seq of the request a REPLY/ERROR answers, else 0
- vgpu: the vGPU / VM the message is about (0 = none)
- ts_ns: the sender's monotonic clock in ns (meaningful on the same host only)
- flags: bit 0 = the sender wants a reply
- payload: any msgpack value; an ERROR carries {"code": errno name, "text": reason}
"""
from __future__ import annotations

import errno as _errno
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = 32 << 20        # a whole GGTT dump (8 MiB) fits; anything larger is refused
FLAG_WANT_REPLY = 1

KINDS = frozenset({
    # link management
    "HELLO", "REPLY", "ERROR", "HEARTBEAT", "STATS", "SHUTDOWN",
    # guest <-> hypervisor
    "MMIO_READ", "MMIO_WRITE", "MMIO_WRITE_BATCH", "WRITE_DONE", "IRQ",
    # hypervisor <-> mediator
    "TRAP", "GPA_READ", "GPA_WRITE", "GFN_PIN", "GFN_UNPIN", "PAGE_TRACK", "TRACKED_WRITE",
    "INJECT_MSI",
    # memory fabric
    "DMA_READ", "DMA_WRITE",
    # mediator <-> gpu, and the ledger's probes of the gpu
    "GM_READ", "GM_WRITE", "GGTT_DUMP", "SYNC",
    # launcher control
    "REGISTER", "READY", "START", "PROGRESS", "REPORT", "VERIFY_PLAN", "VERIFY", "PARTITIONS",
})


class WireError(Exception):
    """A frame that cannot be accepted; `code` is an errno name."""

    def __init__(self, code: str, text: str, seq: int = 0):
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.seq = seq


class RemoteError(Exception):
    """The peer answered a request with an error."""

    def __init__(self, code: str, text: str, peer: str = "?", kind: str = "?"):
        super().__init__(f"{peer} refused {kind}: {code}: {text}")
        self.code = code
        self.text = text


@dataclass(slots=True)
class Envelope:
    kind: str
    seq: int
    reply_to: int
    vgpu: int
    ts: int
    flags: int
    payload: Any
    peer: str = ""          # filled in by the runtime: which link it came from

    @property
    def wants_reply(self) -> bool:
        return bool(self.flags & FLAG_WANT_REPLY)


_packer = msgpack.Packer(use_bin_type=True)


def encode(kind: str, seq: int, reply_to: int, vgpu: int, ts: int, flags: int, payload: Any) -> bytes:
    return _packer.pack((kind, seq, reply_to, vgpu, ts, flags, payload))


def encode_reply(seq: int, reply_to: int, vgpu: int, ts: int, result: Any) -> bytes:
    return _packer.pack(("REPLY", seq, reply_to, vgpu, ts, 0, result))


def encode_error(seq: int, reply_to: int, vgpu: int, ts: int, code: str, text: str) -> bytes:
    return _packer.pack(("ERROR", seq, reply_to, vgpu, ts, 0, {"code": code, "text": text}))


def _is_int(v: Any) -> bool:
    return type(v) is int


def decode(frame: bytes, max_frame: int = MAX_FRAME) -> Envelope:
    """Decode and validate a frame; raise WireError naming what is wrong."""
    if len(frame) > max_frame:
        raise WireError("EMSGSIZE", f"frame of {len(frame)} bytes exceeds the limit of {max_frame}")
    try:
        doc = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several types for garbage
        raise WireError("EBADMSG", f"frame is not msgpack ({type(exc).__name__})") from None
    if type(doc) is not tuple or len(doc) != 7:
        raise WireError("EBADMSG", "envelope must be an array of 7 fields "
                        "[kind, seq, reply_to, vgpu, ts_ns, flags, payload]")
    kind, seq, reply_to, vgpu, ts, flags, payload = doc
    if type(kind) is not str:
        raise WireError("EBADMSG", "envelope field kind must be a string")
    if not (_is_int(seq) and _is_int(reply_to) and _is_int(vgpu) and _is_int(ts) and _is_int(flags)):
        raise WireError("EBADMSG", "envelope fields seq, reply_to, vgpu, ts_ns, flags must be integers",
                        seq if _is_int(seq) else 0)
    if seq < 1:
        raise WireError("EBADMSG", f"seq must be >= 1, got {seq}")
    if kind not in KINDS:
        raise WireError("EPROTO", f"unknown message kind {kind[:40]!r}", seq)
    return Envelope(kind, seq, reply_to, vgpu, ts, flags, payload)


def errno_name(code: int) -> str:
    return _errno.errorcode.get(code, "EIO")
