"""The envelope: one msgpack array per ZeroMQ frame.

    [kind, seq, reply_to, vgpu, ts_ns, flags, payload]            flags bit 1 clear
    [kind, seq, reply_to, vgpu, ts_ns, flags, payload, trace]     flags bit 1 set

- kind: a message kind of nodes.wire.schema; REPLY and ERROR answer requests
- seq: per link and direction, from 1
- reply_to: the seq of the request a REPLY/ERROR answers, else 0
- vgpu: the vGPU / VM the message is about (0: none)
- ts_ns: the sender's monotonic clock in ns (meaningful on the same host only)
- flags: bit 0 = the sender wants a reply; bit 1 = traced; the other bits must be 0
- payload: checked against the kind's schema on decode (a REPLY's against the request's reply)
- trace: only with bit 1: the id (u64, not 0) of the sampled operation the message belongs to.
  A node that records spans notes the message in the span of that operation and carries the id
  on to what the message makes it send; any other node handles the message as if untraced.
"""
from __future__ import annotations

from typing import Any

import msgpack

from nodes.errors import GvtError, WireError
from nodes.wire.schema import KINDS, Kind

PROTOCOL_VERSION = 6
MAX_FRAME = 1 << 20         # ZMQ_MAXMSGSIZE of every socket, and the largest reply a node builds
FLAG_WANT_REPLY = 1
FLAG_TRACED = 2
# Limits every node keeps and announces in HELLO; a peer that goes past them is refused.
MAX_OUTSTANDING = 1024          # requests unanswered on a link, per VM the link speaks for
MAX_POSTED_WRITES = 1 << 17     # posted writes a VM may have queued or in flight at its hypervisor
LINK_SILENT_S = 3.0             # a peer heard from not at all this long is dead (the link protocol)
_U64 = 1 << 64
_U32 = 1 << 32


class Envelope:
    """A decoded frame. `peer` is filled in by the shell: the link it came from."""
    __slots__ = ("kind", "seq", "reply_to", "vgpu", "ts", "flags", "payload", "peer", "trace")

    def __init__(self, kind: str, seq: int, reply_to: int, vgpu: int, ts: int, flags: int,
                 payload: Any, peer: str = "", trace: int = 0):
        self.kind, self.seq, self.reply_to, self.vgpu = kind, seq, reply_to, vgpu
        self.ts, self.flags, self.payload, self.peer = ts, flags, payload, peer
        self.trace = trace          # the sampled operation's id (flags bit 1), else 0

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

# What a reply may carry: the frame limit less the link header, the envelope and a bin header
# per item.
_ENVELOPE_MAX = 64 + 48
_ITEM_MAX = 5


def check_reply_size(data_bytes: int, items: int, what: str, max_frame: int = MAX_FRAME) -> None:
    """Refuse (E2BIG, naming the limit) a request whose reply would not fit in a frame."""
    need = data_bytes + _ITEM_MAX * items + _ENVELOPE_MAX
    if need > max_frame:
        raise GvtError("E2BIG", f"{what} asks for {data_bytes} bytes in {items} parts; a reply "
                       f"carries at most {max_frame - _ENVELOPE_MAX - _ITEM_MAX * items} bytes "
                       f"(frame limit {max_frame})")


def encode(kind: str, seq: int, reply_to: int, vgpu: int, ts: int, flags: int, payload: Any,
           trace: int = 0) -> bytes:
    """A frame; with a trace id (not 0), flags bit 1 is set and the id is the 8th field."""
    if trace:
        return _packer.pack((kind, seq, reply_to, vgpu, ts, flags | FLAG_TRACED, payload, trace))
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
    n = len(doc) if type(doc) is tuple else 0
    if n == 7:
        kind, seq, reply_to, vgpu, ts, flags, payload = doc
        trace = 0
    elif n == 8:
        kind, seq, reply_to, vgpu, ts, flags, payload, trace = doc
    else:
        raise WireError("EBADMSG", "envelope must be an array of 7 fields "
                        "[kind, seq, reply_to, vgpu, ts_ns, flags, payload], or 8 with trace "
                        "when flags bit 1 is set")
    if type(seq) is not int or not 1 <= seq < _U64:
        raise WireError("EBADMSG", "envelope field seq must be an integer in 1..2**64-1")
    if not (type(reply_to) is int and type(vgpu) is int and type(ts) is int and type(flags) is int
            and 0 <= reply_to < _U64 and 0 <= vgpu < _U32 and 0 <= ts < _U64 and 0 <= flags < 4):
        for name, v, top in (("reply_to", reply_to, _U64), ("vgpu", vgpu, _U32), ("ts_ns", ts, _U64),
                             ("flags", flags, 4)):
            if type(v) is not int or not 0 <= v < top:
                raise WireError("EBADMSG", f"envelope field {name} must be an integer in "
                                f"0..{top - 1}", seq)
    if flags & FLAG_TRACED:
        if n != 8 or type(trace) is not int or not 1 <= trace < _U64:
            raise WireError("EBADMSG", "envelope flags bit 1 (traced) needs an 8th field, trace: "
                            "an integer in 1..2**64-1", seq)
    elif n == 8:
        raise WireError("EBADMSG", "an 8th envelope field (trace) comes only with flags bit 1 set",
                        seq)
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
    return Envelope(kind, seq, reply_to, vgpu, ts, flags, payload, "", trace)
