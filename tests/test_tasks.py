"""The task scheduler (nodes.tasks) on its own: lanes, deadlines, replies after their timeout,
failures, events and round-robin turns. Its I/O is a recorder; time is whatever the test says."""
from __future__ import annotations

from typing import Any, Hashable

import pytest

from nodes.actions import YIELD, Call, Event, Post, Signal, Sleep, Wait
from nodes.errors import CallTimeout, GvtError, RemoteError
from nodes.tasks import Scheduler

S = 1_000_000_000


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, Call]] = []
        self.posts: list[Post] = []
        self.finished: list[tuple[Any, Any, BaseException | None]] = []
        self.refuse_posts = False
        self._n = 0

    def send_call(self, call: Call, now: int) -> Hashable:
        self._n += 1
        key = (call.peer, self._n)
        self.calls.append((key, call))
        return key

    def send_post(self, post: Post, now: int) -> None:
        if self.refuse_posts:
            raise GvtError("EAGAIN", "queue full")
        self.posts.append(post)

    def finish(self, origin: Any, result: Any, err: BaseException | None, now: int) -> None:
        self.finished.append((origin, result, err))


@pytest.fixture
def io():
    return Recorder()


@pytest.fixture
def sched(io):
    return Scheduler(io)


def asks(name: str, log: list):
    """A task that makes one call and logs when it starts and ends."""
    log.append(("start", name))
    value = yield Call("peer", "MMIO_READ", {"n": name})
    log.append(("end", name, value))
    return value


def test_a_lane_runs_its_work_one_at_a_time_in_order(io, sched):
    log: list = []
    for name in ("a", "b", "c"):
        sched.submit("lane1", lambda now, n=name: sched.spawn(asks(n, log), now, origin=n, lane="lane1"), 0)
    sched.submit("lane2", lambda now: sched.spawn(asks("x", log), now, origin="x", lane="lane2"), 0)
    assert log == [("start", "a"), ("start", "x")]             # b and c wait for a
    assert sched.lane_queued("lane1") == 2
    sched.resume(io.calls[0][0], 1, None, 10)                  # a's reply
    assert log[-1] == ("end", "a", 1)
    sched.run_ready(11)                                       # b gets its turn
    assert log[-1] == ("start", "b")
    sched.resume(io.calls[2][0], 2, None, 12)
    sched.run_ready(13)
    sched.resume(io.calls[3][0], 3, None, 14)
    assert [e for e in log if e[0] == "end"] == [("end", "a", 1), ("end", "b", 2), ("end", "c", 3)]
    assert [f[0] for f in io.finished] == ["a", "b", "c"]
    assert sched.lane_queued("lane1") == 0


def test_a_reply_after_its_timeout_is_dropped(io, sched):
    got: dict = {}

    def task():
        call = Call("peer", "MMIO_READ", timeout=1.0)
        try:
            yield call
        except CallTimeout as err:
            got["err"], got["at"] = err, call.done_at
    sched.spawn(task(), 0)
    assert sched.next_wake() == 1 * S
    sched.expire(S - 1)
    assert not got
    sched.expire(S)
    assert got["err"].code == "ETIMEDOUT" and got["at"] == S
    assert sched.resume(io.calls[0][0], 42, None, S + 5) is False     # too late
    assert sched.late_replies == 1


def test_done_at_is_the_time_the_reply_came(io, sched):
    box = {}

    def task():
        call = Call("peer", "MMIO_READ")
        box["v"] = yield call
        box["at"] = call.done_at
    sched.spawn(task(), 100)
    sched.resume(io.calls[0][0], 7, None, 250)
    assert box == {"v": 7, "at": 250}


def test_failures_reach_finish_and_a_remote_refusal_is_catchable(io, sched):
    def fails():
        yield Call("peer", "MMIO_READ")
    def catches():
        try:
            yield Call("peer", "MMIO_READ")
        except GvtError as err:
            return err.code
    sched.spawn(fails(), 0, origin="o1")
    sched.spawn(catches(), 0, origin="o2")
    refusal = RemoteError("EINVAL", "bad", "peer", "MMIO_READ")
    sched.resume(io.calls[0][0], None, refusal, 1)
    sched.resume(io.calls[1][0], None, refusal, 1)
    assert io.finished[0][0] == "o1" and io.finished[0][2] is refusal
    assert io.finished[1] == ("o2", "EINVAL", None)


def test_a_task_that_raises_never_takes_the_scheduler_down(io, sched):
    def broken():
        yield Post("peer", "MMIO_WRITE")
        raise KeyError("bug")
    sched.spawn(broken(), 0, origin="o")
    assert isinstance(io.finished[0][2], KeyError)
    def bad():
        yield object()                                        # not an action
    sched.spawn(bad(), 0, origin="p")
    assert io.finished[1][2].code == "EINVAL"


def test_a_refused_post_is_raised_into_the_task(io, sched):
    io.refuse_posts = True
    box = {}

    def task():
        try:
            yield Post("peer", "MMIO_WRITE")
        except GvtError as err:
            box["code"] = err.code
    sched.spawn(task(), 0)
    assert box == {"code": "EAGAIN"}


def test_events_wake_waiters_in_order_and_remember_being_set(io, sched):
    ev, log = Event(), []

    def waiter(n):
        yield Wait(ev)
        log.append(n)
    sched.spawn(waiter(1), 0)
    sched.spawn(waiter(2), 0)
    assert log == []
    def signals():
        yield Signal(ev)
    sched.spawn(signals(), 0)
    assert log == [1, 2]
    sched.spawn(waiter(3), 0)                                 # set already: no wait
    assert log == [1, 2, 3]


def test_sleep_and_yield(io, sched):
    log = []

    def sleeper():
        yield Sleep(0.5)
        log.append("slept")
    def yielder(n):
        for i in range(3):
            log.append((n, i))
            yield YIELD
    sched.spawn(sleeper(), 0)
    sched.spawn(yielder("a"), 0)
    sched.spawn(yielder("b"), 0)
    assert log == [("a", 0), ("b", 0)] and sched.next_wake() == 0
    sched.run_ready(1)                                        # one turn each, in order
    assert log[2:] == [("a", 1), ("b", 1)]
    sched.run_ready(2)
    sched.run_ready(3)
    assert sched.next_wake() == S // 2
    sched.expire(S // 2)
    assert log[-1] == "slept"


def test_fail_calls_ends_every_call_to_a_peer_that_left(io, sched):
    got = []

    def task(peer):
        try:
            yield Call(peer, "MMIO_READ")
        except GvtError as err:
            got.append((peer, err.code))
    sched.spawn(task("gone"), 0)
    sched.spawn(task("here"), 0)
    assert sched.fail_calls(lambda key: key[0] == "gone", GvtError("ECONNRESET", "left"), 1) == 1
    assert got == [("gone", "ECONNRESET")] and sched.pending_calls == 1


def test_a_handler_bug_is_counted_as_an_internal_error_and_a_refusal_is_not():
    """The engine tells a peer's mistake (GvtError) from its own bug (anything else)."""
    from harness import SimNet
    from nodes.core import Core as _Core
    from nodes.errors import GvtError as _G

    class Core(_Core):
        def handle(self, msg, now):
            if msg.payload["size"] == 1:
                raise _G("EINVAL", "a refusal")
            raise RuntimeError("a bug")
    net = SimNet(vgpus=[1])
    net.add("mediator", Core())
    net.add("hypervisor", Core())
    net.connect("hypervisor", "mediator")
    for size in (1, 4):
        try:
            net.call("hypervisor", "mediator", "TRAP_READ", {"off": 0, "size": size}, vgpu=1)
        except _G:
            pass
    eng = net.engines["mediator"]
    assert eng.stats.total("gvtbench_internal_errors") == 1
    assert eng.errors_by_vgpu == {1: {"EINVAL": 1, "EIO": 1}}
    assert eng.internal_errors and eng.internal_errors[0].startswith("RuntimeError: a bug at test_tasks.py:")


def test_a_core_states_its_contract_and_emits_actions_one_way():
    """nodes.core: the engine takes only a Core; what a hook emits goes out after the hook (a
    handler's Post before its reply, a tick's and a peer event's at once), and a hook the core
    did not override is not asked."""
    from harness import Recorder, SimNet
    from nodes.actions import Post, Spawn
    from nodes.core import Core, overrides
    from nodes.engine import NodeEngine

    class NotACore:
        def handle(self, msg, now):
            return None
    with pytest.raises(TypeError, match="nodes.core.Core"):
        NodeEngine("mediator", "mediator", NotACore(), vgpus=[1], clock=lambda: 0)

    class Emitter(Core):
        def __init__(self):
            super().__init__()
            self.ticks = 0

        def handle(self, msg, now):
            self.emit(Post("hypervisor", "INJECT_MSI", {"vector": 1}, vgpu=1))
            return 5

        def tick(self, now):
            self.ticks += 1
            if self.ticks == 1:
                self.emit(Post("hypervisor", "INJECT_MSI", {"vector": 2}, vgpu=1))

        def peer_event(self, name, role, event, why, now):
            def recover():
                yield Post("hypervisor", "INJECT_MSI", {"vector": 3}, vgpu=1)
            self.emit(Spawn(recover()))

    assert overrides(Emitter(), "tick") and not overrides(Emitter(), "lane")
    net = SimNet(vgpus=[1])
    med, hv = Emitter(), Recorder()
    net.add("mediator", med)
    net.add("hypervisor", hv)
    net.connect("hypervisor", "mediator")
    assert net.call("hypervisor", "mediator", "TRAP_READ", {"off": 0, "size": 4}, vgpu=1) == 5
    net.engines["mediator"].peer_event("hypervisor", "hypervisor", "returned", "test", net.now)
    net.run()
    assert sorted(p["vector"] for p in hv.of("INJECT_MSI")) == [1, 2, 3]
    kinds = [e.kind for s, d, e in net.log if s == "mediator"]
    assert kinds.index("INJECT_MSI") < kinds.index("REPLY")     # the handler's Post, then its reply
    assert net.engines["mediator"].internal_errors == []
