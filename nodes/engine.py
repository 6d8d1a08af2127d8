"""A node without its sockets: what happens to a checked message from a link, and to what a core's
tasks send. The runtime puts ZeroMQ around it; the test harness an in-memory network.

For each message: the kind must be one its sender's role may send to this node's role (EPERM),
control kinds come only on the node's link to its launcher (EPERM), a guest speaks only for its
own VM (EPERM), a vGPU id must be one of this run's (ENODEV), and a link may have only so many
requests unanswered (EAGAIN). Then the message goes to its handler, in its lane if the core
gives it one. Every send is guarded: a peer that is gone or does not read costs a counted drop,
never the node.
"""
from __future__ import annotations

from types import GeneratorType
from typing import Any, Callable, Hashable, Iterable

from nodes.actions import Call, Post, Signal, Spawn
from nodes.errors import GvtError, OutcomeUnknown, RemoteError, label_code
from nodes.stats import Stats
from nodes.tasks import Scheduler
from nodes.wire.codec import FLAG_WANT_REPLY, MAX_FRAME, Envelope, encode, encode_error, encode_reply
from nodes.wire.link import Link, SendFailed
from nodes.wire.schema import CONTROL_KINDS, KINDS, may_send

Handler = Callable[[Envelope, int], Any]


class Origin:
    """The request a task answers: its link, its envelope, and when it arrived."""
    __slots__ = ("link", "env", "t0")

    def __init__(self, link: Link, env: Envelope, t0: int):
        self.link, self.env, self.t0 = link, env, t0


class NodeEngine:
    def __init__(self, name: str, role: str, core: Any, *, vgpus: Iterable[int],
                 clock: Callable[[], int], stats: Stats | None = None, max_frame: int = MAX_FRAME):
        self.name, self.role, self.core = name, role, core
        self.vgpus = frozenset(vgpus) | {0}
        self.clock = clock
        self.max_frame = max_frame
        self.links: dict[str, Link] = {}
        self.handlers: dict[str, Handler] = {}
        self._route_cache: dict[tuple[str, bool, str], str | None] = {}
        self.sched = Scheduler(self)
        self.stats = stats or Stats()
        s = self.stats
        s.counter("gvtbench_bad_frames", "Frames refused as malformed, by reason", ["reason"])
        s.counter("gvtbench_refused_messages",
                  "Well-formed messages refused (EPERM, ENODEV, EAGAIN), by sender role and kind",
                  ["role", "kind", "code"])
        s.counter("gvtbench_handler_errors", "Requests that ended in an error, by code", ["code"])
        s.counter("gvtbench_dropped_frames",
                  "Frames this node could not send (peer gone, queue full, too large)", ["reason"])
        s.counter("gvtbench_late_replies", "Replies that came after their request timed out")
        self._core_handle = core.handle
        self._outbox = hasattr(core, "outbox")
        self._lane = getattr(core, "lane", None)
        self._observe = getattr(core, "observe", None)
        self._observed: frozenset[str] = getattr(core, "OBSERVED", frozenset())
        self._tick = getattr(core, "tick", None)
        self._core_wake = getattr(core, "next_wake", None)

    def serve(self, kinds: Iterable[str], handler: Handler) -> None:
        """Route these kinds to `handler` instead of the core (control, the memory fabric)."""
        for k in kinds:
            self.handlers[k] = handler

    # ---- links ---------------------------------------------------------------------------------
    def add_link(self, link: Link) -> None:
        self.links[link.name] = link

    def drop_link(self, name: str, now: int) -> None:
        """Forget a peer that has gone; its calls in flight fail with EHOSTUNREACH."""
        link = self.links.pop(name, None)
        if link is None:
            return
        link.gone_at = link.gone_at or now
        self.sched.fail_calls(lambda key: key[0] == name,
                              OutcomeUnknown("ECONNRESET", f"{name} went away with the request "
                                             f"unanswered"), now)

    # ---- receiving -----------------------------------------------------------------------------
    def deliver(self, link: Link, env: Envelope, now: int) -> None:
        """A decoded, schema-checked message from `link` (HELLO is the shell's business)."""
        link.note_rx(env.seq, now)
        env.peer = link.name
        kind = env.kind
        if kind == "REPLY" or kind == "ERROR":
            self._on_reply(link, env, now)
            return
        wants_reply = env.flags & FLAG_WANT_REPLY
        try:
            self._admit(link, env)
            if wants_reply and link.outstanding >= link.max_outstanding:
                raise GvtError("EAGAIN", f"{link.name} has {link.outstanding} requests unanswered, "
                               f"the limit of its link")
        except GvtError as err:
            self.stats.inc("gvtbench_refused_messages", (link.role, kind, err.code))
            if wants_reply:
                self.send_error(link, env, err)
            return
        if wants_reply:
            link.outstanding += 1
        origin = Origin(link, env, now)
        lane = self._lane(env) if self._lane is not None else None
        if lane is None:
            self._handle(origin, None, now)
        else:
            self.sched.submit(lane, lambda t: self._handle(origin, lane, t), now)

    def _admit(self, link: Link, env: Envelope) -> None:
        kind = env.kind
        key = (link.role, link.control, kind)
        refusal = self._route_cache.get(key, "")
        if refusal == "":
            refusal = self._route_cache[key] = self._route_refusal(link, kind)
        if refusal is not None:
            raise GvtError("EPERM", refusal)
        if link.role == "guest" and env.vgpu not in (0, link.vm):
            raise GvtError("EPERM", f"{link.name} may act only for VM {link.vm}, not {env.vgpu}")
        if env.vgpu not in self.vgpus:
            raise GvtError("ENODEV", f"no vGPU {env.vgpu} in this run")

    def _route_refusal(self, link: Link, kind: str) -> str | None:
        if not may_send(KINDS[kind], link.role, self.role):
            return f"a {link.role} may not send {kind} to a {self.role}"
        if kind in CONTROL_KINDS and not link.control:
            return f"{kind} is a control kind: it comes only from this node's launcher"
        return None

    def _handle(self, origin: Origin, lane: Hashable | None, now: int) -> None:
        env = origin.env
        handler = self.handlers.get(env.kind) or self._core_handle
        try:
            result = handler(env, now)
        except Exception as err:
            self.finish(origin, None, err, now)
            return
        if self._outbox and self.core.outbox:
            self._run_outbox(now)
        if isinstance(result, GeneratorType):
            self.sched.spawn(result, now, origin, lane)
        elif env.flags & FLAG_WANT_REPLY or env.kind in self._observed:
            self.finish(origin, result, None, now)
        # else: a posted message handled at once: nothing to answer, nothing to time

    def _on_reply(self, link: Link, env: Envelope, now: int) -> None:
        key = (link.name, env.reply_to)
        call = self.sched.call_waiting(key)
        if call is None:
            self.stats.inc("gvtbench_late_replies")
            return
        exc: GvtError | None = None
        value = None
        if env.kind == "REPLY":
            try:
                value = KINDS[call.kind].validate_reply(env.payload)
            except GvtError as err:
                exc = GvtError("EPROTO", f"{link.name} answered {call.kind} wrongly: {err.text}")
        else:
            exc = RemoteError(env.payload["code"], env.payload["text"], link.name, call.kind)
        self.sched.resume(key, value, exc, now)

    # ---- TaskIO: what tasks send -----------------------------------------------------------------
    def _link_to(self, peer: str) -> Link:
        link = self.links.get(peer)
        if link is None or link.gone_at:
            raise GvtError("EHOSTUNREACH", f"{self.name} has no link to {peer!r}")
        return link

    def send_call(self, call: Call, now: int) -> Hashable:
        link = self._link_to(call.peer)
        seq = link.tx_seq + 1
        link.send_frame(encode(call.kind, seq, 0, call.vgpu, self.clock(), FLAG_WANT_REPLY, call.payload),
                        seq, self.max_frame, now)
        return (link.name, seq)

    def send_post(self, post: Post, now: int) -> None:
        link = self._link_to(post.peer)
        seq = link.tx_seq + 1
        link.send_frame(encode(post.kind, seq, 0, post.vgpu, self.clock(), 0, post.payload), seq,
                        self.max_frame, now)

    def finish(self, origin: Origin | None, result: Any, err: BaseException | None, now: int) -> None:
        if origin is None:
            if err is not None:
                self.stats.inc("gvtbench_handler_errors", (_code(err),))
            return
        link, env = origin.link, origin.env
        if err is None and env.kind in self._observed:
            self._observe(env, result, self.clock() - origin.t0)
        if not env.wants_reply:
            if err is not None:
                self.stats.inc("gvtbench_handler_errors", (_code(err),))
            return
        link.outstanding -= 1
        if err is None:
            try:
                seq = link.tx_seq + 1
                link.send_frame(encode_reply(seq, env.seq, env.vgpu, self.clock(), result), seq,
                                self.max_frame, now)
                return
            except SendFailed as failed:
                if failed.code != "E2BIG":
                    self._dropped(failed)
                    return
                err = failed
            except Exception as bad:    # a result msgpack cannot carry: a bug, answered as EIO
                err = bad
        self.send_error(link, env, err)

    def send_error(self, link: Link, env: Envelope, err: BaseException) -> None:
        code = _code(err)
        if env.wants_reply:
            self.stats.inc("gvtbench_handler_errors", (code,))
        text = getattr(err, "text", None) or f"{type(err).__name__}: {err}"
        now = self.clock()
        try:
            link.send(lambda s: encode_error(s, env.seq, env.vgpu, now, code, text), self.max_frame, now)
        except SendFailed as failed:
            self._dropped(failed)

    def _dropped(self, failed: SendFailed) -> None:
        self.stats.inc("gvtbench_dropped_frames", (failed.code,))

    # ---- core actions and time -----------------------------------------------------------------------
    def run_actions(self, actions: Iterable[Any] | None, now: int) -> None:
        """Actions returned by a core's tick or queued in its outbox: Posts, tasks, Signals."""
        if not actions:
            return
        for a in actions:
            if type(a) is Post:
                try:
                    self.send_post(a, now)
                except SendFailed as failed:
                    self._dropped(failed)
                except GvtError as err:
                    self.stats.inc("gvtbench_handler_errors", (_code(err),))
            elif type(a) is Signal:
                self.sched.signal(a.event, now)
            elif type(a) is Spawn:
                self.sched.spawn_in(a, now)
            elif isinstance(a, GeneratorType):
                self.sched.spawn(a, now)
            else:
                raise TypeError(f"a core returned {type(a).__name__} as an action")

    def _run_outbox(self, now: int) -> None:
        outbox = getattr(self.core, "outbox", None)
        if outbox:
            self.core.outbox = []
            self.run_actions(outbox, now)

    def step(self, now: int) -> None:
        """After each drain of the sockets: yielded tasks and queued lanes get their turn, then
        timeouts, then the core's tick."""
        self.sched.run_ready(now)
        self.sched.expire(now)
        if self._tick is not None:
            self.run_actions(self._tick(now), now)

    def next_wake(self, now: int) -> int | None:
        w = self.sched.next_wake()
        if self._core_wake is not None:
            c = self._core_wake(now)
            if c is not None:
                w = c if w is None else min(w, c)
        return w


def _code(err: BaseException) -> str:
    return label_code(err.code) if isinstance(err, GvtError) else "EIO"
