"""The link protocol object and seeded fault plans, sans-IO: two LinkProtocol ends on a network
that a FaultPlan drops, duplicates, reorders, delays, corrupts and partitions. Property tests
(hypothesis) over random plans: every body delivered once and in order, buffers bounded, a dead
peer noticed, a restarted peer told apart."""
from __future__ import annotations

import heapq
import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nodes.wire import linkproto as lp
from nodes.wire.faults import FaultPlan, FaultSpecError, duration_ns
from nodes.wire.linkproto import (
    TRANSITIONS, Event, LinkFull, LinkProtocol, LinkStateError, PeerNewStream, PeerRestarted, PeerReturned,
    PeerSilent, State, transition,
)

MS = 1_000_000


class Net:
    """Two ends, `a` and `b`, and the frames between them, delivered at their times."""

    def __init__(self, plan: FaultPlan | None = None, window: int = lp.WINDOW_BYTES,
                 queue: int = lp.QUEUE_BYTES, now: int = 10**9):
        self.now = now
        self.ends = {"a": LinkProtocol(1000, window_bytes=window, queue_bytes=queue, now=now),
                     "b": LinkProtocol(2000, window_bytes=window, queue_bytes=queue, now=now)}
        self.faults = {(s, d): plan.for_link(s, d) if plan else None
                       for s, d in (("a", "b"), ("b", "a"))}
        self.q: list = []
        self.n = itertools.count()
        self.got: dict[str, list[bytes]] = {"a": [], "b": []}
        self.paused: set[str] = set()
        self.max_held = 0

    def put(self, src: str, frames: list[bytes]) -> None:
        dst = "b" if src == "a" else "a"
        f = self.faults[(src, dst)]
        for frame in frames:
            for at, fr in (f.apply(frame, self.now) if f else [(self.now, frame)]):
                heapq.heappush(self.q, (at, next(self.n), dst, fr))

    def send(self, src: str, body: bytes) -> None:
        self.put(src, self.ends[src].send(body, self.now))

    def step_to(self, t: int) -> None:
        """Deliver and tick everything due up to t."""
        while True:
            wakes = [e.next_wake() for n, e in self.ends.items() if n not in self.paused]
            nxt = min([self.q[0][0]] if self.q else [] + [t + 1])
            nxt = min([nxt] + wakes)
            if nxt > t:
                self.now = t
                return
            self.now = max(self.now, nxt)
            while self.q and self.q[0][0] <= self.now:
                _, _, dst, frame = heapq.heappop(self.q)
                if dst in self.paused:
                    continue            # a paused process reads nothing (its socket is gone)
                self.got[dst] += self.ends[dst].receive(frame, self.now)
            for name, e in self.ends.items():
                if name not in self.paused and e.next_wake() <= self.now:
                    self.put(name, e.tick(self.now))
                self.max_held = max(self.max_held, e.held_bytes())

    def settle(self, limit_s: float = 120) -> None:
        end = self.now + int(limit_s * 1e9)
        while any(e.unacked or e.waiting for e in self.ends.values()) and self.now < end:
            self.step_to(self.now + 50 * MS)


# ---- the state table -----------------------------------------------------------------------------
def test_every_row_of_the_transition_table_and_every_refused_edge():
    for (state, event), new in TRANSITIONS.items():
        assert transition(state, event) is new
    for state in State:
        for event in Event:
            if (state, event) not in TRANSITIONS:
                with pytest.raises(LinkStateError) as err:
                    transition(state, event)
                assert state.value in err.value.text and event.value in err.value.text
    assert not any(s is State.CLOSED for s, _ in TRANSITIONS)     # closed is the end


# ---- frames ---------------------------------------------------------------------------------------
def test_a_corrupted_frame_is_counted_and_never_acted_on():
    net = Net()
    frame = net.ends["a"].send(b"hello", net.now)[0]
    for i in range(len(frame)):
        bad = frame[:i] + bytes([frame[i] ^ 0x40]) + frame[i + 1:]
        assert net.ends["b"].receive(bad, net.now) == []
    assert net.ends["b"].counts["corrupt"] == len(frame) and net.ends["b"].rx_next == 1
    assert net.ends["b"].receive(frame, net.now) == [b"hello"]
    for bad in (b"", b"x" * 47):
        with pytest.raises(lp.WireError, match="shorter than the link header"):
            lp.unpack(bad)
    with pytest.raises(lp.WireError, match="flags"):
        lp.unpack(lp.pack(1, 1, 1, 0, 0, 0, 4, b"x"))
    with pytest.raises(lp.WireError, match="no body"):
        lp.unpack(lp.pack(1, 1, 5, 0, 0, 0, 0, b""))


def test_in_order_once_over_a_lossy_network_with_acks_retransmits_and_duplicates():
    plan = FaultPlan.parse(7, ["drop=0.2", "dup=0.2", "reorder=0.2", "corrupt=0.05",
                               "delay=1ms+-1ms"])
    net = Net(plan)
    sent = [f"m{i}".encode() * (1 + i % 7) for i in range(400)]
    for i, body in enumerate(sent):
        net.send("a", body)
        net.send("b", body[::-1])
        net.step_to(net.now + MS // 4)
    net.settle()
    assert net.got["b"] == sent and net.got["a"] == [s[::-1] for s in sent]
    a, b = net.ends["a"], net.ends["b"]
    assert a.counts["retransmits"] > 0 and b.counts["duplicates"] > 0 and b.counts["corrupt"] > 0
    assert b.counts["out_of_order"] > 0 and not a.events and not b.events
    assert 0 < a.srtt < 100 * MS and lp.RTO_MIN_NS <= a.rto <= lp.RTO_MAX_NS


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drop=st.floats(0, 0.25), dup=st.floats(0, 0.3), reorder=st.floats(0, 0.3),
       corrupt=st.floats(0, 0.1), delay_us=st.integers(0, 3000), seed=st.integers(0, 2**32),
       sizes=st.lists(st.integers(1, 40_000), min_size=1, max_size=120),
       gaps_us=st.lists(st.integers(0, 2000), min_size=1, max_size=120))
@example(drop=0.25, dup=0.0, reorder=0.0, corrupt=0.0, delay_us=0, seed=312, sizes=[1, 1, 1, 1],
         gaps_us=[0])       # b's frames dropped six in a row: a declares it silent
def test_property_every_body_is_delivered_once_in_order_and_buffers_stay_bounded(
        drop, dup, reorder, corrupt, delay_us, seed, sizes, gaps_us):
    plan = FaultPlan.parse(seed, [f"drop={drop}", f"dup={dup}", f"reorder={reorder}",
                                  f"corrupt={corrupt}", f"delay={delay_us}us+-{delay_us // 2}us"])
    window, queue = 256 << 10, 1 << 20
    net = Net(plan, window=window, queue=queue)
    sent = []
    for i, size in enumerate(sizes):
        body = i.to_bytes(4, "little") * (size // 4 + 1)
        try:
            net.send("a", body)
            sent.append(body)
        except LinkFull:
            net.step_to(net.now + 20 * MS)      # backpressure: wait, then go on
        net.step_to(net.now + 1000 * gaps_us[i % len(gaps_us)])
    net.settle()
    got = [bytes(b) for b in net.got["b"]]
    # a run of drops may silence b for the liveness timeout (six of its frames in a row, in
    # the example): a then gives up what b had not acked, counts it, and starts a new stream.
    # Nothing else goes missing: what arrived is in order, once, and the rest was given up
    lost = sum(ev.lost for ev in net.ends["a"].events if isinstance(ev, PeerSilent))
    it = iter(sent)
    assert all(any(g == s for s in it) for g in got)            # in order, each at most once
    assert len(sent) - lost <= len(got) <= len(sent)
    if not lost:
        assert got == sent
    # what a link holds never passed its window, its queue and one window out of order
    assert net.max_held <= window + queue + window + max(sizes) + 4
    a = net.ends["a"]
    assert not a.unacked and not a.waiting and a.held_bytes() == 0


def test_a_full_window_and_queue_refuse_with_eagain_and_nothing_is_numbered():
    net = Net(window=10_000, queue=20_000)
    a = net.ends["a"]
    net.paused.add("b")                         # b reads nothing
    n = 0
    with pytest.raises(LinkFull) as err:
        while True:
            net.send("a", b"x" * 1000)
            n += 1
    assert err.value.code == "EAGAIN" and "10000 + 20000" in err.value.text
    assert n == 30 and a.tx_seq == 30 and a.held_bytes() == 30_000
    net.paused.clear()
    net.settle()
    assert len(net.got["b"]) == 30


# ---- liveness, returns and restarts -----------------------------------------------------------------
def test_a_dead_peer_is_noticed_within_3_s_and_what_it_had_unacked_is_reported():
    net = Net()
    for i in range(5):
        net.send("a", b"q%d" % i)
    net.step_to(net.now + 10 * MS)
    net.paused.add("b")
    t0 = net.now
    for i in range(3):
        net.send("a", b"lost%d" % i)
    net.step_to(t0 + lp.DEAD_NS + lp.HEARTBEAT_NS)
    a = net.ends["a"]
    ev = a.take_events()
    assert len(ev) == 1 and isinstance(ev[0], PeerSilent) and ev[0].lost == 3
    assert a.state is State.DEAD and a.counts["deaths"] == 1
    # it returns (a pause longer than the liveness timeout): heard again, the link wants a new
    # HELLO; our next bodies go on a new stream, which b follows
    net.paused.clear()
    stream = a.stream
    net.step_to(net.now + lp.HEARTBEAT_NS + 10 * MS)
    # (b's side gave up on a as well, so a also hears that b starts a new stream)
    assert [type(e) for e in a.take_events() if not isinstance(e, PeerNewStream)] == [PeerReturned]
    assert a.state is State.IDLE
    net.send("a", b"after")
    net.settle()
    assert net.got["b"][-1] == b"after" and b"lost0" not in net.got["b"] and a.stream == stream


def test_a_peer_that_sends_but_never_acks_is_dead_after_max_timeouts_and_resends_stop():
    """A peer that does not read (it sends, so it is heard) would have the oldest body resent
    into the transport forever: after MAX_TIMEOUTS timeouts in a row, and the liveness timeout
    since the body went, it counts as dead (a pause under the timeout still loses nothing)."""
    a = LinkProtocol(1, now=0)
    a.send(b"x" * 1000, 0)
    now, resends = 0, 0
    junk = LinkProtocol(2, now=0)
    while a.state is not State.DEAD and now < 60 * 10**9:
        now = a.next_wake()
        for f in junk.tick(now) or [lp.pack(2, 1, 0, 0, 0, 0, 0, b"")]:
            a.receive(f, now)                   # heard, but never an ack of a's stream
        resends += sum(1 for f in a.tick(now) if lp.unpack(f)[2])
    assert a.state is State.DEAD and lp.MAX_TIMEOUTS <= resends <= lp.MAX_TIMEOUTS + 4
    [ev] = [e for e in a.take_events() if isinstance(e, PeerSilent)]
    assert ev.why == "not_acking" and ev.lost == 1 and not a.unacked
    assert lp.DEAD_NS < now <= lp.DEAD_NS + 3 * lp.RTO_MAX_NS     # then no more resends


def test_a_pause_shorter_than_the_liveness_timeout_loses_nothing():
    net = Net()
    net.paused.add("b")
    for i in range(20):
        net.send("a", b"p%d" % i)
    net.step_to(net.now + lp.DEAD_NS // 2)
    # a paused process's socket keeps what came: here, resend brings it
    net.paused.clear()
    net.settle()
    assert net.got["b"] == [b"p%d" % i for i in range(20)]
    assert not net.ends["a"].events and net.ends["a"].state is State.IDLE


def test_a_restarted_peer_is_told_apart_by_its_new_epoch():
    net = Net()
    a = net.ends["a"]
    a.hello_sent()
    net.send("a", b"HELLO")
    net.step_to(net.now + 10 * MS)
    a.hello_answered()
    net.ends["b"].hello_accepted()
    net.send("a", b"in flight")                 # b dies with it unacked
    old = net.ends["b"]
    net.ends["b"] = LinkProtocol(old.epoch + 1, now=net.now)
    net.q.clear()
    net.got["b"] = []
    net.send("b", b"from the new b")
    net.step_to(net.now + 10 * MS)
    ev = a.take_events()
    assert ev == [PeerRestarted(old.epoch, old.epoch + 1, 1)] and a.state is State.IDLE
    assert net.got["a"] == [b"from the new b"]
    # a stale frame of the old incarnation is ignored
    stale = lp.pack(old.epoch, 1, 9, 0, 0, 0, 0, b"stale")
    assert a.receive(stale, net.now) == [] and a.counts["stale"] == 1
    a.hello_sent()
    net.send("a", b"HELLO again")
    net.settle()
    assert net.got["b"] == [b"HELLO again"]


def test_a_refusal_outside_any_stream_with_a_new_epoch_is_a_restart():
    a = LinkProtocol(5, now=0)
    b = LinkProtocol(6, now=0)
    for f in a.send(b"x", 0):
        b.receive(f, 0)
    for f in b.tick(lp.ACK_DELAY_NS):
        a.receive(f, lp.ACK_DELAY_NS)
    assert a.peer_epoch == 6
    assert a.receive(lp.oob_frame(7, b"refused"), 2 * MS) == [b"refused"]
    assert [type(e) for e in a.take_events()] == [PeerRestarted]


# ---- fault plans --------------------------------------------------------------------------------------
def test_the_fault_grammar_and_its_errors():
    plan = FaultPlan.parse(3, ["drop=0.05", "link=hypervisor-mediator:delay=2ms+-1ms,dup=0.1",
                               "link=gpu>mediator:drop=0.5", "partition=hypervisor-mediator@5s+1s"])
    p = plan.params("mediator", "hypervisor")
    assert (p.drop, p.dup, p.delay_ns, p.jitter_ns) == (0.05, 0.1, 2 * MS, MS)
    assert plan.params("gpu", "mediator").drop == 0.5 and plan.params("mediator", "gpu").drop == 0.05
    assert plan.partitions[0].start_ns == 5 * 10**9 and plan.partitions[0].length_ns == 10**9
    assert [d["kind"] for d in plan.describe()] == ["frames", "frames", "frames", "partition"]
    for bad, why in (("drop=2", "outside"), ("drop=x", "not a probability"), ("boom", "expected"),
                     ("jam=0.1", "unknown fault kind"), ("link=gpu:drop=0.1", "names no link"),
                     ("partition=a-b@5s", r"START\+LENGTH"), ("delay=2xs", "not a duration"),
                     ("delay=1ms+-2ms", "jitter")):
        with pytest.raises(FaultSpecError, match=why):
            FaultPlan.parse(1, [bad])
    assert duration_ns("1.5ms", "") == 1_500_000
    nodes = FaultPlan.parse(1, ["pause=mediator@2s+500ms"])
    # a node fault names a node by its id: a bare role is GPU 0's
    assert nodes.nodes[0].node == "mediator/0" and nodes.nodes[0].length_ns == 500 * MS
    assert nodes.describe() == [{"node": "mediator/0", "kind": "pause", "at_ns": 2 * 10**9,
                                 "length_ns": 500 * MS, "spec": "pause=mediator@2s+500ms"}]
    assert nodes.for_link("hypervisor", "mediator") is None      # a node fault touches no frame
    # the launcher's control links are faulted only when named
    assert plan.params("launcher", "gpu").drop == 0
    assert FaultPlan.parse(1, ["link=launcher-gpu:drop=0.5"]).params("gpu", "launcher").drop == 0.5


def test_the_same_seed_gives_the_same_fate_to_the_kth_frame_on_each_link():
    specs = ["drop=0.1", "dup=0.1", "reorder=0.1", "corrupt=0.1", "delay=1ms+-1ms"]

    def fates(seed):
        f = FaultPlan.parse(seed, specs).for_link("guest1", "hypervisor")
        return [f.apply(b"frame%d" % i, 10**9 + i * MS) for i in range(300)], f.report()
    one, rep1 = fates(11)
    two, rep2 = fates(11)
    other, _ = fates(12)
    assert one == two and rep1 == rep2 and one != other
    assert all(rep1["counts"][k] > 0 for k in ("drop", "dup", "reorder", "corrupt"))
    # another link draws its own schedule from the same seed
    g2 = FaultPlan.parse(11, specs).for_link("guest2", "hypervisor")
    assert [g2.apply(b"frame%d" % i, 10**9 + i * MS) for i in range(300)] != one
    assert FaultPlan.parse(11, ["link=gpu-mediator:drop=1"]).for_link("guest1", "hypervisor") is None


def test_a_partition_drops_everything_in_its_window_only():
    f = FaultPlan.parse(1, ["partition=hypervisor-mediator@1s+500ms"]).for_link("mediator", "hypervisor")
    t0 = 10**9
    assert f.apply(b"x", t0) == [(t0, b"x")]
    assert f.apply(b"x", t0 + 1_200 * MS) == []
    assert f.apply(b"x", t0 + 1_600 * MS) == [(t0 + 1_600 * MS, b"x")]
    assert f.counts["partition"] == 1 and f.report()["log"] == [[1_200 * MS, "partition"]]


def test_a_partition_longer_than_the_liveness_timeout_is_a_death_and_a_return():
    plan = FaultPlan.parse(2, ["partition=a-b@100ms+4s"])
    net = Net(plan)
    for i in range(50):
        net.send("a", b"%d" % i)
        net.step_to(net.now + 10 * MS)
    net.step_to(net.now + 5 * 10**9)
    for name in "ab":
        kinds = [type(e) for e in net.ends[name].take_events()]
        # each end gave up on the other and starts a new stream: the other hears of that too
        assert kinds in ([PeerSilent, PeerReturned], [PeerSilent, PeerNewStream, PeerReturned],
                         [PeerSilent, PeerReturned, PeerNewStream]), (name, kinds)
        assert PeerNewStream in kinds or name == "b", (name, kinds)
    assert net.got["b"] and net.got["b"] == [b"%d" % i for i in range(len(net.got["b"]))]
    lost = net.ends["a"].counts["lost"]
    assert len(net.got["b"]) + lost == 50       # each body delivered once or reported lost


def test_each_link_event_has_a_line_for_the_nodes_log():
    """What a user reads in a node's log when a run failed on its links (nodes/runtime.py)."""
    from nodes.runtime import _describe
    assert _describe(lp.PeerSilent(10_000_000_000, 1)) == \
        "the peer went silent for 10.0 s; 1 bodies given up"
    assert "acked nothing through repeated resends; 3 bodies" in \
        _describe(lp.PeerSilent(50_000_000, 3, "not_acking"))
    assert "restarted (epoch a -> b); 2 bodies lost" in _describe(lp.PeerRestarted(10, 11, 2))
    assert _describe(lp.PeerReturned(5)) == "the peer is heard again"
    assert "new stream 4" in _describe(lp.PeerNewStream(5, 4))
