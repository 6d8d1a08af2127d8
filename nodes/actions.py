"""What a sans-IO core may ask of its shell.

A core's handlers return a value (the reply) or a task: a generator that yields these actions.
The shell performs each one and resumes the task: a Call with its reply (or raises the GvtError
it met: RemoteError, CallTimeout), a Post, Signal, Spawn or Wait at once or when the event is
set, a Sleep after the time has passed. The task's return value is the reply to the request that
started it. Time is given to cores, never read by them: `now` comes with every message and tick,
and a finished Call carries the time its reply arrived in `done_at`.

Tracing: a Call, Post or Spawn may name the sampled operation it belongs to (`trace`, an id the
guest made up when it sampled the operation). None, the default, means: the operation of the
task that sends it, if that task has one. 0 means: none. The shell records the timing; a core
only carries the id as plain data where it alone knows the causal link (a write it forwards
later, a workload that completes long after the ELSP write that made it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nodes.errors import CallTimeout, GvtError  # noqa: F401  (re-exported for cores)

DEFAULT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Call:
    """A request: the task resumes with the peer's reply, or the GvtError raised in its place."""
    peer: str
    kind: str
    payload: Any = None
    vgpu: int = 0
    timeout: float = DEFAULT_TIMEOUT_S
    done_at: int = 0            # set by the shell: monotonic ns when the reply (or timeout) came
    trace: int | None = None    # the sampled operation (see the module doc)


@dataclass(slots=True)
class Post:
    """A one-way message: no reply, ordered with everything else on its link."""
    peer: str
    kind: str
    payload: Any = None
    vgpu: int = 0
    trace: int | None = None    # the sampled operation (see the module doc)


@dataclass(slots=True)
class Now:
    """Resume with the shell's monotonic clock, in ns, read at that moment: for a core that
    measures a stage of its own work (the command parser's scan), which the time a message came
    with cannot tell."""


@dataclass(slots=True)
class Sleep:
    """Resume after this many seconds. Sleep(0) yields: the task resumes after the shell has
    looked at its sockets again, so other work gets a turn (round robin)."""
    seconds: float


@dataclass(eq=False, slots=True)
class Event:
    """A one-shot event a core creates; tasks Wait for it, a core Signals it."""
    name: str = ""
    is_set: bool = False


@dataclass(slots=True)
class Wait:
    """Resume once `event` is set (at once if it is already)."""
    event: Event


@dataclass(slots=True)
class Signal:
    """Set `event` and resume the tasks waiting for it, in the order they began to wait."""
    event: Event


@dataclass(slots=True)
class Spawn:
    """Start another task: in `lane` (after the lane's earlier work, holding it until it ends),
    or at once beside the caller (lane None). The caller goes on without waiting for it.
    With a trace id (not None, not 0) the task is a stage of that sampled operation: the shell
    times it as a span named `span`, on the track of `vgpu`, and what it sends carries the id."""
    gen: Any
    lane: Any = None
    trace: int | None = None
    span: str = ""
    vgpu: int = 0


YIELD = Sleep(0.0)
