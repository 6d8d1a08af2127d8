"""A link: one peer as this node sees it. Its LinkProtocol (nodes/wire/linkproto.py) makes the
stream of frames reliable both ways (epochs, sequence numbers, acks, retransmission, order,
liveness, a window in bytes); around it, the message counts the ledger's conservation check
reads, the sends the transport refused, and what the peer holds of this node (outstanding
requests) against its limit. An optional LinkFaults filter plays the network's faults on the
frames this end sends (nodes/wire/faults.py)."""
from __future__ import annotations

import heapq
from typing import Callable

from nodes.errors import GvtError
from nodes.wire.faults import LinkFaults
from nodes.wire.linkproto import DEAD_NS, HEADER_SIZE, LinkEvent, LinkFull, LinkProtocol, State
from nodes.wire.schema import role_of


class SendFailed(GvtError):
    """The link could not take a frame: too large, or its window and queue are full."""


class Link:
    __slots__ = ("name", "role", "vm", "control", "_send", "rx_seq", "sent", "received", "touched",
                 "gaps", "dups", "send_failed", "transport_drops", "outstanding",
                 "max_outstanding", "version", "proto", "faults", "_rx_gen", "delayed", "earlier",
                 "_lost0")

    def __init__(self, name: str, send: Callable[[bytes], None], *, control: bool = False,
                 max_outstanding: int = 1024, epoch: int = 1, now: int = 0,
                 dead_ns: int = DEAD_NS, faults: LinkFaults | None = None):
        self.name = name
        self.role, self.vm = role_of(name)
        self.control = control      # the node's own link to its launcher: control kinds come here
        self._send = send
        self.rx_seq = 0
        self.sent = 0
        self.received = 0
        self.gaps = 0               # message numbers skipped inside one peer stream: a bug below
        self.dups = 0
        self.send_failed = 0        # bodies refused: too large, or the link full (EAGAIN)
        self.transport_drops = 0    # frames the transport would not take: resent by the protocol
        self.outstanding = 0        # its requests this node has not answered yet
        self.max_outstanding = max_outstanding
        self.version = 0
        self.proto = LinkProtocol(epoch, dead_ns=dead_ns, now=now)
        self.faults = faults
        self.touched: set | None = None     # where the shell notes a link whose timers changed
        self.delayed: list[tuple[int, int, bytes]] = []     # heap of (due, n, frame) the plan holds back
        self._rx_gen = 0
        # what was sent to and received from the peer's earlier incarnations, and the bodies the
        # protocol had given up before this one: the ledger checks this incarnation's stream alone
        self.earlier = {"incarnations": 0, "sent": 0, "received": 0, "gaps": 0}
        self._lost0 = 0

    def new_incarnation(self) -> None:
        """The peer restarted: its new process counts from zero, and so does this stream."""
        e = self.earlier
        e["incarnations"] += 1
        e["sent"] += self.sent
        e["received"] += self.received
        e["gaps"] += self.gaps
        self.sent = self.received = self.gaps = 0
        self._lost0 = self.proto.counts["lost"]

    @property
    def tx_seq(self) -> int:
        return self.proto.tx_seq

    def send(self, build: Callable[[int], bytes], max_frame: int, now: int, counted: bool = True) -> int:
        """Build the next message with its sequence number and send it. SendFailed (E2BIG,
        EAGAIN) if the link cannot take it; nothing is numbered then."""
        seq = self.tx_seq + 1
        return self.send_frame(build(seq), seq, max_frame, now, counted)

    def send_frame(self, body: bytes, seq: int, max_frame: int, now: int, counted: bool = True) -> int:
        """send() of a message already built with seq = tx_seq + 1 (no closure on the hot path)."""
        if len(body) + HEADER_SIZE > max_frame:
            self.send_failed += 1
            raise SendFailed("E2BIG", f"a frame of {len(body) + HEADER_SIZE} bytes to {self.name} "
                             f"exceeds the frame limit of {max_frame} bytes")
        try:
            frame = self.proto.send_now(body, now)
        except LinkFull as full:
            self.send_failed += 1
            raise SendFailed("EAGAIN", f"the link to {self.name} is full: {full.text}") from None
        if counted:
            self.sent += 1
        if self.touched is not None:
            self.touched.add(self)
        if frame is not None:
            if self.faults is None:
                try:
                    self._send(frame)
                except SendFailed:
                    self.transport_drops += 1
            else:
                self.put([frame], now)
        return seq

    def put(self, frames: list[bytes], now: int) -> None:
        """Frames of the protocol onto the transport (through the fault plan, if any). A frame
        the transport refuses is lost as on any network: the protocol resends it."""
        faults = self.faults
        for f in frames:
            if faults is None:
                self._raw(f)
                continue
            for due, fr in faults.apply(f, now):
                if due <= now:
                    self._raw(fr)
                else:
                    heapq.heappush(self.delayed, (due, faults.frames, fr))

    def _raw(self, frame: bytes) -> None:
        try:
            self._send(frame)
        except SendFailed:
            self.transport_drops += 1

    def flush_delayed(self, now: int) -> None:
        """The frames the fault plan held back whose time has come."""
        d = self.delayed
        while d and d[0][0] <= now:
            self._raw(heapq.heappop(d)[2])

    def receive(self, frame: bytes, now: int) -> list[bytes]:
        """The messages a frame from the peer makes deliverable, in order, each once."""
        if self.touched is not None:
            self.touched.add(self)
        return self.proto.receive(frame, now)

    def tick(self, now: int) -> list[LinkEvent]:
        """Resends, acks and heartbeats due now; returns what happened to the link."""
        if self.delayed:
            self.flush_delayed(now)
        self.put(self.proto.tick(now), now)
        return self.proto.take_events() if self.proto.events else []

    def next_wake(self) -> int:
        w = self.proto.next_wake()
        return min(w, self.delayed[0][0]) if self.delayed else w

    def note_rx(self, seq: int, now: int, counted: bool = True) -> None:
        """A message was handed up: counted, and its number checked against the last one of
        its peer stream (the protocol delivers in order: a gap or a repeat here is a bug)."""
        if counted:
            self.received += 1
        gen = self.proto.rx_gen
        if gen != self._rx_gen:
            self._rx_gen, self.rx_seq = gen, 0
        if seq == self.rx_seq + 1:
            self.rx_seq = seq
        elif seq > self.rx_seq:
            self.gaps += seq - self.rx_seq - 1
            self.rx_seq = seq
        else:
            self.dups += 1

    def counters(self) -> dict:
        c = self.proto.counts
        faults = self.faults.report() if self.faults else {"counts": {}, "log": []}
        return {"sent": self.sent, "received": self.received, "gaps": self.gaps, "dups": self.dups,
                "send_failed": self.send_failed, "transport_drops": self.transport_drops,
                "tx_seq": self.tx_seq, "rx_seq": self.rx_seq, "outstanding": self.outstanding,
                "state": self.proto.state.value, "epoch": self.proto.peer_epoch,
                "retransmits": c["retransmits"], "duplicates": c["duplicates"],
                "corrupt": c["corrupt"], "out_of_order": c["out_of_order"], "lost": c["lost"],
                "acks": c["acks"], "restarts": c["restarts"], "deaths": c["deaths"],
                "given_up": c["lost"] - self._lost0, "earlier": dict(self.earlier),
                "srtt_us": self.proto.srtt // 1000,
                "memory": type(self) is MemoryLink,     # in memory: two nodes of one process
                "faults": faults["counts"],
                # each fault the plan played, [ns since the link's first frame, kind]: the first
                # FAULT_LOG_MAX of each direction (past them, only counted)
                "faults_log": faults["log"]}


NEVER = 1 << 62             # a MemoryLink's timers once it is open


class MemoryLink(Link):
    """A link to a node of the same process (nodes.runtime: NodeHost.inbox). Its HELLO goes
    framed through the protocol like any other, so states and versions are checked alike; once
    open, bodies are handed over as they are, numbered in one sequence with what went before:
    a hand-over in memory is in order and never lost, so acks, resends and liveness have
    nothing to do (and the peer cannot go silent without this node). A link with a fault plan
    stays framed, so the faults play on it."""
    __slots__ = ("_hand", "_tx")

    def __init__(self, name: str, send: Callable[[bytes], None], hand: Callable[[bytes], None],
                 **kw) -> None:
        super().__init__(name, send, **kw)
        self._hand = hand
        self._tx = self.proto.tx_seq

    @property
    def tx_seq(self) -> int:
        return self._tx         # the protocol's own while framed (send_frame keeps it)

    def send_frame(self, body: bytes, seq: int, max_frame: int, now: int, counted: bool = True) -> int:
        if self.faults is not None or self.proto.state is not State.OPEN:
            seq = super().send_frame(body, seq, max_frame, now, counted)
            self._tx = self.proto.tx_seq
            return seq
        if len(body) + HEADER_SIZE > max_frame:
            self.send_failed += 1
            raise SendFailed("E2BIG", f"a frame of {len(body) + HEADER_SIZE} bytes to {self.name} "
                             f"exceeds the frame limit of {max_frame} bytes")
        try:
            self._hand(body)
        except SendFailed as err:
            self.send_failed += 1
            raise SendFailed("EAGAIN", f"the link to {self.name} is full: {err.text}") from None
        self._tx = seq
        if counted:
            self.sent += 1
        return seq

    def tick(self, now: int) -> list[LinkEvent]:
        if self.faults is None and self.proto.state is State.OPEN:
            return []
        return super().tick(now)

    def next_wake(self) -> int:
        if self.faults is None and self.proto.state is State.OPEN:
            return NEVER
        return super().next_wake()
