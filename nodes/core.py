"""The contract between a role's sans-IO core and its shell (nodes.engine.NodeEngine, with the
runtime's sockets or the tests' in-memory network around it).

A core subclasses Core and overrides the hooks it needs; the others do nothing. The shell calls
each hook with the time (`now`, monotonic ns: a core never reads a clock) and the message it is
about (which carries its trace id, `msg.trace`):

- handle(msg, now): the message's reply (a value), or a task (a generator of nodes.actions) whose
  return value is the reply. Raising a GvtError refuses the message; anything else is the core's
  own bug (counted, and it fails the run's verdict).
- lane(msg): the lane the message is handled in (requests of one lane run one after another, in
  order), or None: at once.
- tick(now): called after every poll of the sockets and at next_wake(now).
- next_wake(now): the time the core next wants its tick (None: no need).
- peer_event(name, role, event, why, now): a peer restarted, returned, went silent, or was
  replaced (its calls in flight already failed).
- accepting(vm): whether the shell should read VM vm's socket now (flow control).
- observe(msg, result, elapsed_ns): a request of a kind in OBSERVED was answered (with
  `result`), `elapsed_ns` after it arrived (the core records its service time).
- snapshot(): what the core adds to STATS.

One way to emit actions: a hook or a handler that has something to send, start or signal outside
a task's own yields calls emit(); the shell takes what was emitted after every hook it called
(take_actions) and performs it. Posts, Spawns (or bare task generators) and Signals may be
emitted.

RESTORED_PEERS: peers whose state the core rewrites when they come back, so that a Post to one
while its link is down is dropped and counted (as a register write to a GPU in reset is lost)
instead of failing the task that sent it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

from nodes.errors import GvtError


@dataclass(frozen=True, slots=True)
class Ctx:
    """What a message's handling passes down to the code that needs it, instead of parking it on a
    shared object: the time the message came (monotonic ns) and the sampled operation it belongs
    to (0: none)."""
    now: int
    trace: int = 0


class Core:
    OBSERVED: frozenset[str] = frozenset()
    RESTORED_PEERS: frozenset[str] = frozenset()

    def __init__(self) -> None:
        self.outbox: list[Any] = []

    # ---- what a core does ---------------------------------------------------------------------
    def handle(self, msg: Any, now: int) -> Any:
        # a core that takes no messages refuses each one as a peer's mistake, not as its bug
        raise GvtError("ENOTSUP", f"a {type(self).__name__} handles no {msg.kind}")

    def lane(self, msg: Any) -> Hashable | None:
        return None

    def tick(self, now: int) -> None:
        return None

    def next_wake(self, now: int) -> int | None:
        return None

    def peer_event(self, name: str, role: str, event: str, why: str, now: int) -> None:
        return None

    def accepting(self, vm: int) -> bool:
        return True

    def observe(self, msg: Any, result: Any, elapsed_ns: int) -> None:
        return None

    def snapshot(self) -> dict:
        return {}

    # ---- what it sends ------------------------------------------------------------------------
    def emit(self, *actions: Any) -> None:
        """Queue actions for the shell to perform after the hook that is running."""
        self.outbox.extend(actions)

    def take_actions(self) -> list[Any]:
        """What was emitted since the shell last looked (the shell calls it)."""
        out = self.outbox
        if out:
            self.outbox = []
        return out


def overrides(core: Core, hook: str) -> bool:
    """Whether the core's class has its own `hook`: the shell asks a hook that does nothing for
    every frame or poll only when it does something."""
    return getattr(type(core), hook) is not getattr(Core, hook)
