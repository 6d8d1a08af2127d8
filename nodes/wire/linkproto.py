"""The link as a protocol object, sans-IO: one peer's stream of frames both ways, made reliable
over a transport that may drop, duplicate, reorder, delay or corrupt them. The ZeroMQ shell and
the test network drive the same object: `send(body, now)` and `tick(now)` return the frames to
put on the transport, `receive(frame, now)` the bodies to hand up, in order and each once;
what happened to the link besides (the peer restarted, went silent, came back) is queued in
`events` for the layer above.

A frame is a 48-byte header and a body (an envelope of nodes.wire.codec, or nothing):

    crc32 u32 | stream u32 | epoch u64 | seq u64 | ack u64 | ack_epoch u64 | ack_stream u32 | flags u32

all little-endian. `crc32` (zlib's) covers everything after it, body included: a corrupted
frame is dropped and counted, never acted on. `epoch` names the sender's incarnation (a new
process, a new epoch; epochs only grow), `stream` its numbering of this link within the
incarnation (a new stream restarts `seq` at 1 after the sender gave up what it had in flight).
`seq` numbers the bodies of one stream from 1; seq 0 is a frame with no body: an ack, which
also serves as the heartbeat. `ack` is cumulative: every body of the peer's stream
(`ack_epoch`, `ack_stream`) up to it has arrived. Flags bit 0 marks a frame outside any stream
(a refusal to a peer that has no link yet): it is handed up once, never acked nor resent.

The sender keeps each body until it is acked, resends it after a retransmission timeout
One timer runs for the oldest unacked body, as TCP's (Jacobson/Karels from the round trips of
bodies sent once, Karn's rule); when it fires the oldest body is resent and the timer doubles,
up to RTO_MAX_NS, until an ack moves. The oldest is also resent at once after DUP_ACKS acks
that repeat while bodies wait, and in recovery after each ack that moves but not past what
was sent when it began (NewReno's partial ack: the next hole) (the receiver acks at once what
arrives out of order, and with the usual delay what arrives again, so a copy the network made
does not look like a hole). At most `window_bytes` of bodies are unacked; past that, bodies wait in
order, up to `queue_bytes`, and past that `send` refuses (EAGAIN): a peer that does not read
meets backpressure, and what one peer can make this link hold is window + queue on the way
out and a window of bodies out of order on the way in.

Liveness: a link that has sent nothing for HEARTBEAT_NS sends an ack; a peer heard from not
at all for `dead_ns`, or that acks nothing of a body sent `dead_ns` ago through MAX_TIMEOUTS
timeouts in a row (it is heard, but does not read), is dead: what it had unacked is given up (counted in `lost`, reported as
an event) and the next body starts a new stream. Heard again, it has returned (the connecting
side says HELLO again); heard with a new epoch, it has restarted.
"""
from __future__ import annotations

import struct
import zlib
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Union

from nodes.errors import GvtError, WireError

HEADER = struct.Struct("<IIQQQQII")     # crc32, stream, epoch, seq, ack, ack_epoch, ack_stream, flags
HEADER_SIZE = HEADER.size               # 48
_REST = struct.Struct("<IQQQQII")       # the header after its crc
FLAG_OOB = 1                            # outside any stream: a refusal before a link exists
FLAGS_KNOWN = FLAG_OOB

HEARTBEAT_NS = 500_000_000              # an idle link acks this often...
DEAD_NS = 3_000_000_000                 # ...and a peer silent this long is dead
ACK_DELAY_NS = 4_000_000                # a body not answered by a frame of ours within this is acked
                                        # (longer than a moderate load's gap between requests, so
                                        # the next one carries the ack: fewer pure acks)
RTO_MIN_NS = 8_000_000                  # over the peer's ack delay and a round trip, and a
                                        # busy peer's scheduling delay: at 2 ms, a loaded 2-core
                                        # machine resent spuriously
RTO_INIT_NS = 200_000_000
RTO_MAX_NS = 500_000_000
MAX_TIMEOUTS = 8                        # timeouts in a row (and dead_ns) without an ack: dead
DUP_ACKS = 1                            # repeated pure acks with bodies waiting: the first is
                                        # resent (a receiver repeats its ack at once only for a
                                        # gap: a copy of a frame is acked with the usual delay)
WINDOW_BYTES = 8 << 20                  # unacked bodies on the way out, and out of order on the way in
QUEUE_BYTES = 8 << 20                   # bodies waiting for the window
_U32, _U64 = 1 << 32, 1 << 64


class LinkFull(GvtError):
    """The link holds as much as it may toward its peer: window and queue are full (EAGAIN)."""


# ---- states and transitions ----------------------------------------------------------------------
class State(Enum):
    IDLE = "idle"               # made; no HELLO yet either way
    HELLO_SENT = "hello_sent"   # the connecting side said HELLO and waits for its answer
    OPEN = "open"               # HELLO answered (connecting side) or accepted (the other)
    DEAD = "dead"               # silent past the liveness timeout; what was in flight is given up
    CLOSED = "closed"           # the layer above is done with it


class Event(Enum):
    HELLO_SENT = "hello_sent"
    HELLO_ANSWERED = "hello_answered"
    HELLO_ACCEPTED = "hello_accepted"
    SILENT = "silent"           # nothing heard for dead_ns
    HEARD = "heard"             # a frame from a peer that was dead (same epoch)
    RESTARTED = "restarted"     # a frame with a new epoch
    CLOSE = "close"


S, E = State, Event
# state x event -> state; anything else is refused with both named. A restart takes any live
# link back to where a new peer's link starts: the connecting side says HELLO again, the other
# waits for it.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.HELLO_SENT): S.HELLO_SENT,
    (S.IDLE, E.HELLO_ACCEPTED): S.OPEN,
    (S.IDLE, E.RESTARTED): S.IDLE,
    (S.IDLE, E.SILENT): S.DEAD,
    (S.HELLO_SENT, E.HELLO_ANSWERED): S.OPEN,
    (S.HELLO_SENT, E.HELLO_SENT): S.HELLO_SENT,     # said again: the first went unanswered
    (S.HELLO_SENT, E.SILENT): S.DEAD,
    (S.HELLO_SENT, E.RESTARTED): S.IDLE,
    (S.OPEN, E.HELLO_ACCEPTED): S.OPEN,         # HELLO again on a live link: answered again
    (S.OPEN, E.HELLO_SENT): S.HELLO_SENT,       # the connecting side checks the peer again
    (S.OPEN, E.SILENT): S.DEAD,
    (S.OPEN, E.RESTARTED): S.IDLE,
    (S.DEAD, E.HEARD): S.IDLE,                  # it returned: a new HELLO before anything else
    (S.DEAD, E.RESTARTED): S.IDLE,
    (S.DEAD, E.SILENT): S.DEAD,
}
for _s in (S.IDLE, S.HELLO_SENT, S.OPEN, S.DEAD):
    TRANSITIONS[(_s, E.CLOSE)] = S.CLOSED


class LinkStateError(GvtError):
    """An event the link's state does not take: our own bug, not a peer's (their frames never
    drive a transition the table lacks)."""


def transition(state: State, event: Event) -> State:
    new = TRANSITIONS.get((state, event))
    if new is None:
        raise LinkStateError("EPROTO", f"a link in state {state.value} cannot take {event.value}")
    return new


# ---- what the layer above hears ----------------------------------------------------------------
@dataclass(frozen=True)
class PeerRestarted:
    old_epoch: int
    new_epoch: int
    lost: int               # our bodies it had not acked: its old incarnation took them


@dataclass(frozen=True)
class PeerSilent:
    silent_ns: int
    lost: int               # our bodies it had not acked, given up
    why: str = "silent"     # silent: nothing heard; not_acking: heard, but it acks nothing


@dataclass(frozen=True)
class PeerReturned:
    epoch: int


@dataclass(frozen=True)
class PeerNewStream:
    """The peer (same incarnation) started a new stream to us: it gave up what it had in flight
    (it took us for dead). Some of that may have reached us before, some never will."""
    epoch: int
    stream: int


LinkEvent = Union[PeerRestarted, PeerSilent, PeerReturned, PeerNewStream]


# ---- frames ----------------------------------------------------------------------------------------
_CRC = struct.Struct("<I")
_HEADER_FROM = HEADER.unpack_from
_crc32 = zlib.crc32


def pack(epoch: int, stream: int, seq: int, ack: int, ack_epoch: int, ack_stream: int,
         flags: int, body: bytes) -> bytes:
    rest = _REST.pack(stream, epoch, seq, ack, ack_epoch, ack_stream, flags)
    return b"".join((_CRC.pack(zlib.crc32(body, zlib.crc32(rest))), rest, body))


def unpack(frame: bytes) -> tuple[int, int, int, int, int, int, int, bytes]:
    """(epoch, stream, seq, ack, ack_epoch, ack_stream, flags, body) of a frame whose checksum
    holds; WireError EBADMSG naming what is wrong otherwise. The body is a view into the frame
    (no copy; msgpack reads it as it is)."""
    if len(frame) < HEADER_SIZE:
        raise WireError("EBADMSG", f"a frame of {len(frame)} bytes is shorter than the link "
                        f"header ({HEADER_SIZE} bytes)")
    crc, stream, epoch, seq, ack, ack_epoch, ack_stream, flags = HEADER.unpack_from(frame)
    mv = memoryview(frame)
    if zlib.crc32(mv[4:]) != crc:
        raise WireError("EBADMSG", "the link header's crc32 does not match the frame: corrupted")
    if flags & ~FLAGS_KNOWN:
        raise WireError("EBADMSG", f"link header flags {flags:#x}: only bit 0 (outside any stream) "
                        f"is defined")
    body = mv[HEADER_SIZE:]
    if seq and not body and not flags & FLAG_OOB:
        raise WireError("EBADMSG", f"a frame with seq {seq} carries no body (seq 0 is an ack)")
    if not seq and body and not flags & FLAG_OOB:
        raise WireError("EBADMSG", "a frame with seq 0 (an ack) carries a body")
    return epoch, stream, seq, ack, ack_epoch, ack_stream, flags, body


def oob_frame(epoch: int, body: bytes) -> bytes:
    """A frame outside any stream (a refusal where there is no link to number it)."""
    return pack(epoch, 0, 0, 0, 0, 0, FLAG_OOB, body)


# A body in flight is a tuple (seq, body, sent_at): tuples of ints and bytes leave the garbage
# collector's lists, so a window of thousands costs it nothing.
_Out = tuple


class LinkProtocol:
    """One end of a link (see the module's docstring). `epoch`: this node's incarnation."""

    def __init__(self, epoch: int, *, window_bytes: int = WINDOW_BYTES,
                 queue_bytes: int = QUEUE_BYTES, dead_ns: int = DEAD_NS,
                 heartbeat_ns: int = HEARTBEAT_NS, now: int = 0):
        if not 0 < epoch < _U64:
            raise ValueError(f"epoch {epoch} must be in 1..2**64-1")
        self.state = State.IDLE
        self.epoch = epoch
        self.window_bytes, self.queue_bytes = window_bytes, queue_bytes
        self.dead_ns, self.heartbeat_ns = dead_ns, heartbeat_ns
        # our stream
        self.stream = 1
        self.tx_seq = 0                         # the last seq given to a body
        self.unacked: deque[_Out] = deque()     # sent, not acked, in seq order
        self.unacked_bytes = 0
        self.waiting: deque[_Out] = deque()     # numbered, waiting for the window
        self.waiting_bytes = 0
        self.acked = 0                          # the peer has every body of our stream up to this
        self._dup_acks = 0
        self._fast = False                      # resend the first unacked body at the next tick
        self._rto_at = 0                        # the retransmission timer (0: nothing unacked)
        self._backoff = 0
        self._recover = 0                       # in recovery until the peer acks this seq
        self._resent_hi = 0                     # the highest seq of this stream sent again
        # the peer's stream
        self.peer_epoch = 0
        self.peer_stream = 0
        self.rx_next = 1                        # the seq of the peer's stream we deliver next
        self.rx_gen = 0                         # peer streams seen: bumped at each new one
        self.ooo: dict[int, bytes] = {}         # out of order: seq -> body
        self.ooo_bytes = 0
        self._ack_due = 0                       # 0: nothing to ack
        # time
        self.last_rx = now
        self.last_tx = now
        self.srtt = 0
        self.rttvar = 0
        self.rto = RTO_INIT_NS
        self.events: list[LinkEvent] = []
        self.sent = self.delivered = 0          # bodies sent once, and handed up
        self.counts = {"retransmits": 0, "duplicates": 0,
                       "out_of_order": 0, "corrupt": 0, "stale": 0, "over_window": 0, "acks": 0,
                       "lost": 0, "restarts": 0, "deaths": 0, "bad": 0}

    # ---- state ----------------------------------------------------------------------------------
    def _to(self, event: Event) -> None:
        self.state = transition(self.state, event)

    def hello_sent(self) -> None:
        self._to(Event.HELLO_SENT)

    def hello_answered(self) -> None:
        self._to(Event.HELLO_ANSWERED)

    def hello_accepted(self) -> None:
        self._to(Event.HELLO_ACCEPTED)

    def close(self) -> None:
        self._to(Event.CLOSE)

    @property
    def alive(self) -> bool:
        return self.state in (State.IDLE, State.HELLO_SENT, State.OPEN)

    # ---- sending --------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        """The seq the next body sent will have (the envelope inside carries it too)."""
        return self.tx_seq + 1

    def send(self, body: bytes, now: int) -> list[bytes]:
        """Number a body and return the frames to send now: it, or nothing if the window is full
        (it waits its turn). LinkFull if the queue is full as well: nothing was numbered."""
        frame = self.send_now(body, now)
        return [] if frame is None else [frame]

    def send_now(self, body: bytes, now: int) -> bytes | None:
        """send() for the hot path: the one frame to send now, or None (it waits its turn). The
        common case is written out in place."""
        size = len(body)
        unacked = self.unacked
        if self.waiting or unacked and self.unacked_bytes + size > self.window_bytes:
            if self.waiting_bytes + size > self.queue_bytes:
                raise LinkFull("EAGAIN", f"the link holds {self.unacked_bytes} bytes unacked and "
                               f"{self.waiting_bytes} waiting, its limit of "
                               f"{self.window_bytes} + {self.queue_bytes}")
            self.tx_seq += 1
            self.waiting.append((self.tx_seq, body, 0))
            self.waiting_bytes += size
            return None
        seq = self.tx_seq = self.tx_seq + 1
        if not unacked:
            self._rto_at = now + min(RTO_MAX_NS, self.rto << self._backoff)
        unacked.append((seq, body, now))
        self.unacked_bytes += size
        self.sent += 1
        self.last_tx = now
        self._ack_due = 0           # the frame carries our ack
        rest = _REST.pack(self.stream, self.epoch, seq, self.rx_next - 1, self.peer_epoch,
                          self.peer_stream, 0)
        return b"".join((_CRC.pack(_crc32(body, _crc32(rest))), rest, body))

    def _put(self, o: _Out, now: int) -> bytes:
        if not self.unacked:
            self._rto_at = now + (min(RTO_MAX_NS, self.rto << self._backoff))
        o = (o[0], o[1], now)
        self.unacked.append(o)
        self.unacked_bytes += len(o[1])
        self.sent += 1
        return self._frame(o, now)

    def _frame(self, o: _Out, now: int) -> bytes:
        self.last_tx = now
        self._ack_due = 0           # the frame carries our ack
        return pack(self.epoch, self.stream, o[0], self.rx_next - 1, self.peer_epoch,
                    self.peer_stream, 0, o[1])

    def ack_frame(self, now: int) -> bytes:
        self.last_tx = now
        self._ack_due = 0
        self.counts["acks"] += 1
        return pack(self.epoch, self.stream, 0, self.rx_next - 1, self.peer_epoch,
                    self.peer_stream, 0, b"")

    def _fill(self, now: int, out: list[bytes]) -> None:
        while self.waiting and (not self.unacked or
                                self.unacked_bytes + len(self.waiting[0][1]) <= self.window_bytes):
            o = self.waiting.popleft()
            self.waiting_bytes -= len(o[1])
            out.append(self._put(o, now))

    def _give_up(self) -> int:
        """Forget what we had in flight and start a new stream; returns how many bodies went."""
        n = len(self.unacked) + len(self.waiting)
        self.unacked.clear()
        self.waiting.clear()
        self.unacked_bytes = self.waiting_bytes = 0
        self.counts["lost"] += n
        self.stream = self.stream + 1 if self.stream + 1 < _U32 else 1
        self.tx_seq = self.acked = 0
        self._dup_acks = 0
        self._fast = False
        self._backoff = 0
        self._rto_at = 0
        self._recover = 0
        self._resent_hi = 0
        return n

    # ---- receiving -------------------------------------------------------------------------------
    def receive(self, frame: bytes, now: int) -> list[bytes]:
        """The bodies a frame makes deliverable, in order, each once (often none or one). A frame
        that is corrupt, stale or malformed is counted and yields nothing."""
        if len(frame) >= HEADER_SIZE:
            # the common case written out: the next body of the peer's stream, nothing odd
            crc, stream, epoch, seq, ack, ack_epoch, ack_stream, flags = _HEADER_FROM(frame)
            mv = memoryview(frame)
            if (seq == self.rx_next and not flags and epoch == self.peer_epoch
                    and stream == self.peer_stream and len(frame) > HEADER_SIZE
                    and _crc32(mv[4:]) == crc and self.state is not State.DEAD and not self.ooo):
                self.last_rx = now
                if ack > self.acked:
                    self._on_ack(ack, ack_epoch, ack_stream, False, now)
                self.rx_next = seq + 1
                self.delivered += 1
                if not self._ack_due:
                    self._ack_due = now + ACK_DELAY_NS
                return [frame[HEADER_SIZE:]]
        try:
            epoch, stream, seq, ack, ack_epoch, ack_stream, flags, body = unpack(frame)
        except WireError as err:
            self.counts["corrupt" if "crc32" in err.text else "bad"] += 1
            return []
        return self.receive_parts(epoch, stream, seq, ack, ack_epoch, ack_stream, flags, body, now)

    def receive_parts(self, epoch: int, stream: int, seq: int, ack: int, ack_epoch: int,
                      ack_stream: int, flags: int, body: bytes, now: int) -> list[bytes]:
        """receive() of a frame already unpacked (the shell unpacks a new peer's first frame
        before it has a link)."""
        if flags & FLAG_OOB:
            # a refusal from a peer that has no link for us: if it carries a new epoch, the
            # peer restarted and our stream went with its old incarnation
            if self.peer_epoch and epoch > self.peer_epoch:
                self._restarted(epoch, 0)
            self.last_rx = now
            return [body] if body else []       # empty: "no link here", a notice only
        if epoch < self.peer_epoch or (epoch == self.peer_epoch and stream < self.peer_stream):
            self.counts["stale"] += 1          # an older incarnation's or stream's straggler
            return []
        if epoch != self.peer_epoch:
            if self.peer_epoch:
                self._restarted(epoch, stream)
            self._new_peer_stream(epoch, stream)
        elif stream != self.peer_stream:
            if self.peer_stream:
                self.events.append(PeerNewStream(epoch, stream))
            self._new_peer_stream(epoch, stream)  # it gave up what it had in flight to us
        if self.state is State.DEAD:
            self._to(Event.HEARD)
            self.events.append(PeerReturned(epoch))
        self.last_rx = now
        self._on_ack(ack, ack_epoch, ack_stream, seq == 0, now)
        out: list[bytes] = []
        if not seq:
            return out
        if seq < self.rx_next:
            # a repeat: our ack was lost, or the network copied the frame. Say the ack again,
            # but with the usual delay: an ack at once would be a repeated pure ack to the
            # sender, and two make it resend (spuriously, for a copy), and its resend is a
            # repeat here again
            self.counts["duplicates"] += 1
            if not self._ack_due:
                self._ack_due = now + ACK_DELAY_NS
            return out
        if seq > self.rx_next:
            if seq not in self.ooo:
                if self.ooo_bytes + len(body) > self.window_bytes:
                    self.counts["over_window"] += 1
                else:
                    self.ooo[seq] = body
                    self.ooo_bytes += len(body)
                    self.counts["out_of_order"] += 1
            else:
                self.counts["duplicates"] += 1
            self._ack_due = now                 # a gap: the sender hears of it at once
            return out
        out.append(body)
        self.rx_next += 1
        while self.ooo:
            nxt = self.ooo.pop(self.rx_next, None)
            if nxt is None:
                break
            self.ooo_bytes -= len(nxt)
            out.append(nxt)
            self.rx_next += 1
        self.delivered += len(out)
        if not self._ack_due:
            self._ack_due = now + ACK_DELAY_NS
        return out

    def start_at(self, epoch: int, stream: int, seq: int) -> None:
        """A new peer's stream begins at `seq` (its HELLO: what it sent before was refused)."""
        self._new_peer_stream(epoch, stream)
        self.rx_next = seq

    def _restarted(self, epoch: int, stream: int) -> None:
        lost = self._give_up()
        self.counts["restarts"] += 1
        self.events.append(PeerRestarted(self.peer_epoch, epoch, lost))
        if self.state is not State.CLOSED:
            self._to(Event.RESTARTED)
        self._new_peer_stream(epoch, stream)

    def _new_peer_stream(self, epoch: int, stream: int) -> None:
        self.peer_epoch, self.peer_stream = epoch, stream
        self.rx_gen += 1
        self.rx_next = 1
        self.ooo.clear()
        self.ooo_bytes = 0

    def _on_ack(self, ack: int, ack_epoch: int, ack_stream: int, pure: bool, now: int) -> None:
        """Release what the peer acked; repeated pure acks while bodies wait resend the first."""
        if ack_epoch != self.epoch or ack_stream != self.stream or ack > self.tx_seq:
            return          # about another incarnation's or stream's bodies, or nonsense
        if ack > self.acked:
            self._dup_acks = 0
            # Karn, widened: a round trip is timed only if nothing acked with it was resent
            # (bodies behind a resent one waited out of order: their time is the recovery's)
            clean = self._resent_hi <= self.acked
            self.acked = ack
            newest = None
            unacked = self.unacked
            while unacked and unacked[0][0] <= ack:
                newest = unacked.popleft()
                self.unacked_bytes -= len(newest[1])
            if clean and newest is not None:
                self._rtt(now - newest[2])
            self._backoff = 0
            self._rto_at = now + self.rto if self.unacked else 0
            if self.unacked and ack < self._recover:
                self._fast = True               # a partial ack (NewReno): the next hole, now
            elif ack >= self._recover:
                self._recover = 0
        elif pure and self.unacked and ack == self.acked:
            self._dup_acks += 1
            if self._dup_acks == DUP_ACKS and not self._recover:
                self._fast = True               # resent at the next tick

    def _rtt(self, sample: int) -> None:
        if not self.srtt:
            self.srtt, self.rttvar = sample, sample // 2
        else:
            self.rttvar += (abs(self.srtt - sample) - self.rttvar) // 4
            self.srtt += (sample - self.srtt) // 8
        self.rto = min(RTO_MAX_NS, max(RTO_MIN_NS, self.srtt + 4 * self.rttvar))

    # ---- time ------------------------------------------------------------------------------------
    def tick(self, now: int) -> list[bytes]:
        """Frames due now: resends, bodies the window has room for, an ack; and the liveness
        check (a dead peer is an event, and what it had unacked is given up)."""
        out: list[bytes] = []
        if self.state is State.CLOSED:
            return out
        # a peer never heard from is not dead: the connecting side waits for its HELLO's answer
        # (the call's timeout bounds that)
        if self.alive and self.peer_epoch and now - self.last_rx > self.dead_ns:
            lost = self._give_up()
            self.counts["deaths"] += 1
            self._to(Event.SILENT)
            self.events.append(PeerSilent(now - self.last_rx, lost))
            self.ooo.clear()
            self.ooo_bytes = 0
        if self.unacked:
            if self._fast:
                self._fast = False
                self._recover = self._recover or self.tx_seq
                self._resend(self.unacked[0], now, out)
            if (self._rto_at <= now and self._backoff >= MAX_TIMEOUTS
                    and now - self.unacked[0][2] > self.dead_ns):
                # it is heard but acks nothing (it does not read): as good as dead. Resending
                # on would only pile copies into the transport's queue toward it
                lost = self._give_up()
                self.counts["deaths"] += 1
                self._to(Event.SILENT)
                self.events.append(PeerSilent(now - self.last_rx, lost, "not_acking"))
                self.ooo.clear()
                self.ooo_bytes = 0
            elif self._rto_at <= now:
                self._recover = self.tx_seq
                self._resend(self.unacked[0], now, out)
                self._backoff = min(self._backoff + 1, 16)
                self._rto_at = now + min(RTO_MAX_NS, self.rto << self._backoff)
        self._fill(now, out)
        if self._ack_due and self._ack_due <= now or now - self.last_tx >= self.heartbeat_ns:
            out.append(self.ack_frame(now))
        return out

    def _resend(self, o: _Out, now: int, out: list[bytes]) -> None:
        if o[0] > self._resent_hi:
            self._resent_hi = o[0]
        self.counts["retransmits"] += 1
        out.append(self._frame(o, now))

    def next_wake(self) -> int:
        """When tick has something to do next (at the latest the liveness check)."""
        w = self.last_tx + self.heartbeat_ns
        if self.alive and self.peer_epoch:
            w = min(w, self.last_rx + self.dead_ns + 1)
        if self._ack_due:
            w = min(w, self._ack_due)
        if self.unacked:
            w = min(w, 0 if self._fast else self._rto_at)
        return w

    def send_wake(self) -> int | None:
        """When a frame is due that the peer needs (an ack, a resend): next_wake without the
        heartbeat and the liveness check (None: none is due)."""
        w = self._ack_due or None
        if self.unacked:
            t = 0 if self._fast else self._rto_at
            w = t if w is None else min(w, t)
        return w

    def held_bytes(self) -> int:
        """What this link holds for its peer, both ways: the bound the window gives."""
        return self.unacked_bytes + self.waiting_bytes + self.ooo_bytes

    def take_events(self) -> list[LinkEvent]:
        ev, self.events = self.events, []
        return ev
