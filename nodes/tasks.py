"""The task scheduler: runs the tasks of a core (generators yielding nodes.actions), keeps lanes and
deadlines, and takes the time from its caller. It owns no socket: sends go through a TaskIO.

Lanes: the work of one lane (a vGPU's accesses, say) runs one item at a time, in order. A lane
whose task finishes while more work is queued gets its next turn in run_ready(), after the other
ready lanes and yielded tasks: lanes are served round robin, one item per turn.
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Any, Callable, Hashable, Protocol

from nodes.actions import Call, Event, Now, Post, Signal, Sleep, Spawn, Wait
from nodes.errors import CallTimeout, GvtError


class TaskIO(Protocol):
    def send_call(self, call: Call, now: int) -> Hashable:
        """Send a request; return the key its reply will be delivered under. Raise GvtError if
        it cannot be sent."""

    def send_post(self, post: Post, now: int) -> None:
        """Send a one-way message; raise GvtError if it cannot be sent."""

    def finish(self, origin: Any, result: Any, err: BaseException | None, now: int) -> None:
        """A task ended: answer whoever `origin` is (None: nobody waits; count a failure)."""

    def clock(self) -> int:
        """Monotonic ns, read now (a task's Now)."""

    # Optional, for tracing: `span_for(spawn, now)` gives the span a Spawn of a traced task opens
    # (or None), and `end_span(span)` closes it when that task ends. A span is opaque here; the
    # task that runs with one is `current` while it steps, so the I/O can tell whose sends are
    # whose.


class _Task:
    __slots__ = ("gen", "origin", "lane", "call", "span")

    def __init__(self, gen: Any, origin: Any, lane: Hashable | None, span: Any = None):
        self.gen, self.origin, self.lane, self.span = gen, origin, lane, span
        self.call: Call | None = None


class _Lane:
    __slots__ = ("queue", "active")

    def __init__(self) -> None:
        self.queue: deque[Callable[[int], None]] = deque()
        self.active = 0             # the task (or the turn) holding the lane


class Scheduler:
    def __init__(self, io: TaskIO):
        self.io = io
        self._pending: dict[Hashable, _Task] = {}          # call key or sleep key -> task
        self._deadlines: list[tuple[int, int, Hashable]] = []
        self._waiting: dict[Event, deque[_Task]] = {}
        self._lanes: dict[Hashable, _Lane] = {}
        self._ready_lanes: deque[Hashable] = deque()
        self._yielded: deque[_Task] = deque()
        self._n = itertools.count()
        self.late_replies = 0
        self.current: _Task | None = None      # the task stepping now (for the I/O's tracing)
        self._span_for = getattr(io, "span_for", None)
        self._end_span = getattr(io, "end_span", None)

    # ---- entry points -----------------------------------------------------------------------
    def spawn(self, gen: Any, now: int, origin: Any = None, lane: Hashable | None = None,
              span: Any = None) -> None:
        """Start a task. With a lane, the lane is held until the task ends. `span`: the I/O's
        span the task runs in (a traced message it handles, or a traced Spawn)."""
        task = _Task(gen, origin, lane, span)
        if lane is not None:
            self._lanes.setdefault(lane, _Lane()).active += 1
        self._step(task, None, None, now)

    def spawn_in(self, action: Spawn, now: int) -> None:
        """A Spawn action: the task starts in its lane's turn, or at once without a lane. A
        traced one opens its span now, so the span shows the wait for the lane too."""
        gen, lane = action.gen, action.lane
        span = self._span_for(action, now) if action.trace and self._span_for is not None else None
        if lane is None:
            self.spawn(gen, now, None, None, span)
        else:
            self.submit(lane, lambda t: self.spawn(gen, t, None, lane, span), now)

    def submit(self, lane: Hashable, start: Callable[[int], None], now: int) -> bool:
        """Run `start(now)` at once if `lane` is idle (True), else queue it behind the lane's
        earlier work (False). `start` either completes at once or spawns a task in the lane."""
        st = self._lanes.get(lane)
        if st is not None and (st.active or st.queue):
            st.queue.append(start)
            return False
        start(now)
        return True

    def lane_idle(self, lane: Hashable) -> bool:
        """Nothing runs or waits in `lane`: what submit() would start at once."""
        st = self._lanes.get(lane)
        return st is None or not (st.active or st.queue)

    def lane_queued(self, lane: Hashable) -> int:
        st = self._lanes.get(lane)
        return len(st.queue) if st else 0

    def resume(self, key: Hashable, value: Any, exc: BaseException | None, now: int) -> bool:
        """A reply (value) or a refusal (exc) for the call sent under `key`. False if no task
        waits for it any more (it timed out)."""
        task = self._pending.pop(key, None)
        if task is None:
            self.late_replies += 1
            return False
        if task.call is not None:
            task.call.done_at = now
            task.call = None
        self._step(task, value, exc, now)
        return True

    def call_waiting(self, key: Hashable) -> Call | None:
        """The call a task waits on under `key`, if one still does."""
        task = self._pending.get(key)
        return task.call if task is not None else None

    def fail_calls(self, match: Callable[[Hashable], bool], err: GvtError, now: int) -> int:
        """Resume every task whose pending call key matches with `err` (a peer that is gone)."""
        keys = [k for k, t in self._pending.items() if t.call is not None and match(k)]
        for k in keys:
            self.resume(k, None, err, now)
        return len(keys)

    def expire(self, now: int) -> None:
        """Time out calls and end sleeps whose deadline has passed."""
        dl = self._deadlines
        due = []
        while dl and dl[0][0] <= now:
            due.append(heapq.heappop(dl)[2])
        for key in due:
            task = self._pending.pop(key, None)
            if task is None:
                continue            # answered already
            call = task.call
            if call is None:        # a Sleep ran out
                self._step(task, None, None, now)
            else:
                call.done_at = now
                task.call = None
                self._step(task, None, CallTimeout(call.peer, call.kind, call.timeout), now)

    def run_ready(self, now: int) -> None:
        """One turn for each yielded task and each lane with queued work, in arrival order."""
        for _ in range(len(self._yielded)):
            self._step(self._yielded.popleft(), None, None, now)
        for _ in range(len(self._ready_lanes)):
            lane = self._ready_lanes.popleft()
            st = self._lanes.get(lane)
            if st is None or st.active or not st.queue:
                continue
            st.active += 1          # the turn holds the lane while its item starts
            try:
                st.queue.popleft()(now)
            finally:
                self._release(lane, st)

    def signal(self, event: Event, now: int) -> None:
        event.is_set = True
        for task in self._waiting.pop(event, ()):
            self._step(task, None, None, now)

    def next_wake(self) -> int | None:
        """The earliest time something is due: 0 when work is ready now, None when nothing is."""
        if self._yielded or self._ready_lanes:
            return 0
        return self._deadlines[0][0] if self._deadlines else None

    @property
    def pending_calls(self) -> int:
        return sum(1 for t in self._pending.values() if t.call is not None)

    # ---- stepping ---------------------------------------------------------------------------------
    def _step(self, task: _Task, value: Any, exc: BaseException | None, now: int) -> None:
        prev = self.current
        self.current = task
        try:
            self._run(task, value, exc, now)
        finally:
            self.current = prev

    def _run(self, task: _Task, value: Any, exc: BaseException | None, now: int) -> None:
        gen = task.gen
        while True:
            try:
                action = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                self._finish(task, stop.value, None, now)
                return
            except Exception as err:        # a failing task never takes the node down
                self._finish(task, None, err, now)
                return
            value, exc = None, None
            kind = type(action)
            if kind is Call:
                try:
                    key = self.io.send_call(action, now)
                except GvtError as err:
                    exc = err
                    continue
                task.call = action
                self._pending[key] = task
                heapq.heappush(self._deadlines, (now + int(action.timeout * 1e9), next(self._n), key))
                return
            if kind is Post:
                try:
                    self.io.send_post(action, now)
                except GvtError as err:     # the task learns its message did not go out
                    exc = err
                continue
            if kind is Sleep:
                if action.seconds <= 0:
                    self._yielded.append(task)
                else:
                    key = ("sleep", next(self._n))
                    self._pending[key] = task
                    heapq.heappush(self._deadlines, (now + int(action.seconds * 1e9), key[1], key))
                return
            if kind is Wait:
                if action.event.is_set:
                    continue
                self._waiting.setdefault(action.event, deque()).append(task)
                return
            if kind is Signal:
                self.signal(action.event, now)
                continue
            if kind is Spawn:
                self.spawn_in(action, now)
                continue
            if kind is Now:
                value = self.io.clock()
                continue
            exc = GvtError("EINVAL", f"a task yielded {kind.__name__}, not an action")

    def _finish(self, task: _Task, result: Any, err: BaseException | None, now: int) -> None:
        try:
            self.io.finish(task.origin, result, err, now)
        finally:
            if task.span is not None and task.origin is None and self._end_span is not None:
                self._end_span(task.span)       # a traced Spawn's (a request's: closed by finish)
            if task.lane is not None:
                st = self._lanes.get(task.lane)
                if st is not None:
                    self._release(task.lane, st)

    def _release(self, lane: Hashable, st: _Lane) -> None:
        st.active -= 1
        if st.active:
            return
        if st.queue:
            self._ready_lanes.append(lane)
        else:
            del self._lanes[lane]
