"""A link: one peer as this node sees it. Sequence numbers both ways, what was sent and received
(the ledger's conservation check), sequence gaps, sends that failed, and what the peer holds of
this node (outstanding requests) against its limit. Acks, retransmission and injected faults
belong here when they come."""
from __future__ import annotations

from typing import Callable

from nodes.errors import GvtError
from nodes.wire.schema import role_of


class SendFailed(GvtError):
    """The transport could not take a frame: the peer is gone, or its queue is full."""


class Link:
    __slots__ = ("name", "role", "vm", "control", "_send", "tx_seq", "rx_seq", "sent", "received",
                 "gaps", "dups", "send_failed", "outstanding", "max_outstanding", "gone_at",
                 "version", "last_rx", "last_tx", "heartbeats")

    def __init__(self, name: str, send: Callable[[bytes], None], *, control: bool = False,
                 max_outstanding: int = 1024):
        self.name = name
        self.role, self.vm = role_of(name)
        self.control = control      # the node's own link to its launcher: control kinds come here
        self._send = send
        self.tx_seq = 0
        self.rx_seq = 0
        self.sent = 0
        self.received = 0
        self.gaps = 0               # sequence numbers never seen: messages lost on the way to us
        self.dups = 0
        self.send_failed = 0        # frames the transport refused (peer gone, queue full)
        self.outstanding = 0        # its requests this node has not answered yet
        self.max_outstanding = max_outstanding
        self.gone_at = 0            # monotonic ns the peer disconnected (0: connected)
        self.version = 0
        self.last_rx = 0
        self.last_tx = 0
        self.heartbeats = 0         # sent and received; kept out of the message counts

    def send(self, build: Callable[[int], bytes], max_frame: int, now: int, counted: bool = True) -> int:
        """Build the next frame with its sequence number and send it. The number is used only
        if the frame went out, so a refused send leaves no gap for the peer to see. SendFailed
        (E2BIG, EAGAIN, EHOSTUNREACH) if it could not go, counted."""
        seq = self.tx_seq + 1
        return self.send_frame(build(seq), seq, max_frame, now, counted)

    def send_frame(self, frame: bytes, seq: int, max_frame: int, now: int, counted: bool = True) -> int:
        """send() of a frame already built with seq = tx_seq + 1 (no closure on the hot path)."""
        if len(frame) > max_frame:
            self.send_failed += 1
            raise SendFailed("E2BIG", f"a frame of {len(frame)} bytes to {self.name} exceeds the "
                             f"frame limit of {max_frame} bytes")
        try:
            self._send(frame)
        except SendFailed:
            self.send_failed += 1
            raise
        self.tx_seq = seq
        self.last_tx = now
        if counted:
            self.sent += 1
        else:
            self.heartbeats += 1
        return seq

    def note_rx(self, seq: int, now: int, counted: bool = True) -> None:
        if counted:
            self.received += 1
        else:
            self.heartbeats += 1
        self.last_rx = now
        if seq == self.rx_seq + 1:
            self.rx_seq = seq
        elif seq > self.rx_seq:
            self.gaps += seq - self.rx_seq - 1
            self.rx_seq = seq
        else:
            self.dups += 1

    def counters(self) -> dict:
        return {"sent": self.sent, "received": self.received, "gaps": self.gaps, "dups": self.dups,
                "send_failed": self.send_failed, "heartbeats": self.heartbeats, "tx_seq": self.tx_seq, "rx_seq": self.rx_seq,
                "outstanding": self.outstanding}
