"""The envelope: one msgpack array per ZeroMQ frame.

    [kind, seq, reply_to, vgpu, ts_ns, flags, payload]

- kind: a message kind of nodes.wire.schema; REPLY and ERROR answer requests
- seq: per link and direction, from 1
- reply_to: the seq of the request a REPLY/ERROR answers, else 0
- vgpu: the vGPU / VM the message is about (0: none)
- ts_ns: the sender's monotonic clock in ns (meaningful on the same host only)
- flags: bit 0 = the sender wants a reply; the other bits must be 0
- payload: checked against the kind's schema on decode (a REPLY's against the request's reply)
"""
from __future__ import annotations

from typing import Any

import msgpack

from nodes.errors import GvtError, WireError
from nodes.wire.schema import KINDS, Kind

PROTOCOL_VERSION = 2
MAX_FRAME = 1 << 20         # ZMQ_MAXMSGSIZE of every socket, and the largest reply a node builds
FLAG_WANT_REPLY = 1
# Limits every node keeps and announces in HELLO; a peer that goes past them is refused.
MAX_OUTSTANDING = 1024          # requests unanswered on a link, per VM the link speaks for
MAX_POSTED_WRITES = 1 << 17     # posted writes a VM may have queued or in flight at its hypervisor
HEARTBEAT_S = 5.0               # a connecting peer sends HEARTBEAT when it has sent nothing this long
LINK_SILENT_S = 30.0            # a link that has sent nothing this long is dropped
_U64 = 1 << 64
_U32 = 1 << 32


class Envelope:
    """A decoded frame. `peer` is filled in by the shell: the link it came from."""
    __slots__ = ("kind", "seq", "reply_to", "vgpu", "ts", "flags", "payload", "peer")

    def __init__(self, kind: str, seq: int, reply_to: int, vgpu: int, ts: int, flags: int,
                 payload: Any, peer: str = ""):
        self.kind, self.seq, self.reply_to, self.vgpu = kind, seq, reply_to, vgpu
        self.ts, self.flags, self.payload, self.peer = ts, flags, payload, peer

    def __repr__(self) -> str:
        return (f"Envelope({self.kind}, seq={self.seq}, reply_to={self.reply_to}, vgpu={self.vgpu}, "
                f"flags={self.flags}, peer={self.peer!r})")

    @property
    def wants_reply(self) -> bool:
        return bool(self.flags & FLAG_WANT_REPLY)

    @property
    def spec(self) -> Kind:
        return KINDS[self.kind]


_packer = msgpack.Packer(use_bin_type=True)

# What a reply may carry: the frame limit less the envelope and a bin header per item.
_ENVELOPE_MAX = 64
_ITEM_MAX = 5


def check_reply_size(data_bytes: int, items: int, what: str, max_frame: int = MAX_FRAME) -> None:
    """Refuse (E2BIG, naming the limit) a request whose reply would not fit in a frame."""
    need = data_bytes + _ITEM_MAX * items + _ENVELOPE_MAX
    if need > max_frame:
        raise GvtError("E2BIG", f"{what} asks for {data_bytes} bytes in {items} parts; a reply "
                       f"carries at most {max_frame - _ENVELOPE_MAX - _ITEM_MAX * items} bytes "
                       f"(frame limit {max_frame})")


def encode(kind: str, seq: int, reply_to: int, vgpu: int, ts: int, flags: int, payload: Any) -> bytes:
    return _packer.pack((kind, seq, reply_to, vgpu, ts, flags, payload))


def encode_reply(seq: int, reply_to: int, vgpu: int, ts: int, result: Any) -> bytes:
    return _packer.pack(("REPLY", seq, reply_to, vgpu, ts, 0, result))


def encode_error(seq: int, reply_to: int, vgpu: int, ts: int, code: str, text: str) -> bytes:
    return _packer.pack(("ERROR", seq, reply_to, vgpu, ts, 0, {"code": code, "text": text[:4096]}))


def decode(frame: bytes, max_frame: int = MAX_FRAME) -> Envelope:
    """Decode a frame and check it against the schema; raise WireError naming what is wrong.

    EMSGSIZE: larger than the limit; EBADMSG: not msgpack, or not an envelope; EPROTO: unknown
    kind; EINVAL: the payload does not fit the kind's schema (the field is named).
    """
    if len(frame) > max_frame:
        raise WireError("EMSGSIZE", f"frame of {len(frame)} bytes exceeds the limit of {max_frame}")
    try:
        doc = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False)
    except Exception as exc:    # msgpack raises several types for garbage
        raise WireError("EBADMSG", f"frame is not msgpack ({type(exc).__name__})") from None
    if type(doc) is not tuple or len(doc) != 7:
        raise WireError("EBADMSG", "envelope must be an array of 7 fields "
                        "[kind, seq, reply_to, vgpu, ts_ns, flags, payload]")
    kind, seq, reply_to, vgpu, ts, flags, payload = doc
    if type(seq) is not int or not 1 <= seq < _U64:
        raise WireError("EBADMSG", "envelope field seq must be an integer in 1..2**64-1")
    if not (type(reply_to) is int and type(vgpu) is int and type(ts) is int and type(flags) is int
            and 0 <= reply_to < _U64 and 0 <= vgpu < _U32 and 0 <= ts < _U64 and 0 <= flags < 2):
        for name, v, top in (("reply_to", reply_to, _U64), ("vgpu", vgpu, _U32), ("ts_ns", ts, _U64),
                             ("flags", flags, 2)):
            if type(v) is not int or not 0 <= v < top:
                raise WireError("EBADMSG", f"envelope field {name} must be an integer in "
                                f"0..{top - 1}", seq)
    if type(kind) is not str:
        raise WireError("EBADMSG", "envelope field kind must be a string", seq)
    spec = KINDS.get(kind)
    if spec is None:
        raise WireError("EPROTO", f"unknown message kind {kind[:40]!r}", seq)
    if kind == "REPLY" or kind == "ERROR":
        if reply_to == 0:
            raise WireError("EBADMSG", f"{kind} needs reply_to, the seq of the request it answers", seq)
    if kind != "REPLY":     # a REPLY is checked against the request it answers
        try:
            spec.validate(payload)
        except Exception as err:
            raise WireError("EINVAL", getattr(err, "text", str(err)), seq) from None
    return Envelope(kind, seq, reply_to, vgpu, ts, flags, payload)
