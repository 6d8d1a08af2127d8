"""A node without its sockets: what happens to a checked message from a link, and to what a core's
tasks send. The runtime puts ZeroMQ around it; the test harness an in-memory network.

For each message: the kind must be one its sender's role may send to this node's role (EPERM),
control kinds come only on the node's link to its launcher (EPERM), a guest speaks only for its
own VM (EPERM), a vGPU id must be one of this run's (ENODEV), and a link may have only so many
requests unanswered (EAGAIN). Then the message goes to its handler, in its lane if the core
gives it one. Every send is guarded: a peer that is gone or does not read costs a counted drop,
never the node.

Spans (a node made with trace_spans > 0): a stage of a sampled operation, timed here, never in a
core. A traced message opens a span from its arrival until it has been handled (its reply sent,
its task ended); a traced Spawn opens one for its task; a traced Post or Call that no open span
of the same operation covers gets one of its own (a Call's lasts until its reply has been
handled). Each span lists the traced messages of its operation it received and sent, as
(peer, seq, ns, kind): the launcher pairs the two ends of each message into a flow. What a task
sends carries its span's trace id unless the core names another. At most trace_spans spans are
kept (and TRACE_HOPS_MAX messages per span): a peer's trace flags cannot make a node hold more.
"""
from __future__ import annotations

from types import GeneratorType
from typing import Any, Callable, Hashable, Iterable

from nodes.actions import Call, Post, Signal, Spawn
from nodes.core import Core, overrides
from nodes.errors import GvtError, OutcomeUnknown, RemoteError, label_code
from nodes.stats import Stats
from nodes.tasks import Scheduler
from nodes.wire.codec import FLAG_WANT_REPLY, MAX_FRAME, Envelope, encode, encode_error, encode_reply
from nodes.wire.link import Link, SendFailed
from nodes.wire.linkproto import State
from nodes.wire.schema import CONTROL_KINDS, KINDS, may_send

Handler = Callable[[Envelope, int], Any]

TRACE_SPANS_MAX = 16384     # spans a tracing node keeps (about 10 MB)
TRACE_HOPS_MAX = 16         # messages noted per span
TRACE_PAGE = 1024           # spans per TRACE_DUMP reply at most...
_SPAN_BYTES, _HOP_BYTES = 200, 100      # ...and as many as fit half a frame, by these bounds
_CALLS_PRUNE = 1024         # traced calls remembered before those that timed out are forgotten


class Span:
    """An open span: `kind` says what opened it (handle: a message; task: a Spawn; post, call:
    a message sent outside any span of its operation)."""
    __slots__ = ("name", "vgpu", "trace", "t0", "kind", "ins", "outs")

    def __init__(self, name: str, vgpu: int, trace: int, t0: int, kind: str):
        self.name, self.vgpu, self.trace, self.t0, self.kind = name, vgpu, trace, t0, kind
        self.ins: list[tuple[str, int, int, str]] = []      # (from, seq, arrival ns, kind)
        self.outs: list[tuple[str, int, int, str]] = []     # (to, seq, send ns, kind)


def _hop(hops: list, peer: str, seq: int, t: int, kind: str) -> None:
    if len(hops) < TRACE_HOPS_MAX:
        hops.append((peer, seq, t, kind))


class Origin:
    """The request a task answers: its link, its envelope, when it arrived, its span (if the
    message was traced and this node records spans), and the peer stream it came on."""
    __slots__ = ("link", "env", "t0", "span", "gen")

    def __init__(self, link: Link, env: Envelope, t0: int, span: Span | None = None):
        self.link, self.env, self.t0, self.span = link, env, t0, span
        self.gen = link.proto.rx_gen


class NodeEngine:
    def __init__(self, name: str, role: str, core: Core, *, vgpus: Iterable[int],
                 clock: Callable[[], int], stats: Stats | None = None, max_frame: int = MAX_FRAME,
                 trace_spans: int = 0):
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
                  "Well-formed messages refused (EPERM, ENODEV, EAGAIN), by the sender's role and "
                  "kind (peer_role, not role: the launcher's scrape targets carry `role`)",
                  ["peer_role", "kind", "code"])
        s.counter("gvtbench_handler_errors", "Requests that ended in an error, by code", ["code"])
        s.counter("gvtbench_dropped_frames",
                  "Frames this node could not send (peer gone, queue full, too large)", ["reason"])
        s.counter("gvtbench_posts_while_down", "Posts not sent because their peer was down; the "
                  "core restores that peer's state when it returns", ["peer"])
        s.counter("gvtbench_stale_frames", "Frames of a stream to an earlier incarnation of this "
                  "node (the sender learns of the restart from the answer)")
        s.counter("gvtbench_early_frames", "Frames that overtook the HELLO opening their link "
                  "(dropped: the sender resends them once the link is open)")
        s.counter("gvtbench_late_replies", "Replies that came after their request timed out")
        s.counter("gvtbench_stale_replies", "Answers not sent: the peer that asked restarted, went "
                  "silent or was replaced since")
        s.counter("gvtbench_internal_errors",
                  "Handlers and tasks that failed with something other than a refusal (GvtError): "
                  "this node's own bugs, which fail the run's verdict")
        # requests that failed, by the vGPU they were for (0: none) and errno, and the first few
        # internal errors: what the ledger reads to tell a hostile guest's refusals from bugs
        self.errors_by_vgpu: dict[int, dict[str, int]] = {}
        self.internal_errors: list[str] = []
        if not isinstance(core, Core):
            raise TypeError(f"a node's core is a nodes.core.Core, not {type(core).__name__}")
        # the hooks (nodes.core); one that does nothing is not asked at every frame or poll
        self._core_handle = core.handle
        self._lane = core.lane if overrides(core, "lane") else None
        self._observe = core.observe
        self._observed: frozenset[str] = core.OBSERVED
        self._tick = core.tick if overrides(core, "tick") else None
        self._core_wake = core.next_wake if overrides(core, "next_wake") else None
        self._peer_event = core.peer_event if overrides(core, "peer_event") else None
        # peers whose state the core restores when they come back (the mediator rewrites a
        # restarted gpu's GGTT and fences): a post to one while its link is down is dropped and
        # counted, as a register write to a GPU in reset is lost, instead of failing the task
        self._restored: frozenset[str] = core.RESTORED_PEERS
        # tracing: 0 spans kept means this node records none and sends no trace id on
        self.trace_spans = trace_spans
        self.spans: list[tuple] = []        # closed: (t0, t1, vgpu, name, trace, kind, ins, outs)
        self.spans_dropped = 0
        self._calls: dict[Hashable, tuple[Span, bool]] = {}    # traced call -> (span, its own)
        self._calls_prune_at = _CALLS_PRUNE
        self._ctx: Span | None = None       # the span of the message whose core actions run now
        if trace_spans:
            s.counter("gvtbench_trace_spans", "Spans of sampled operations, kept or dropped (past "
                      "the node's bound)", ["outcome"])

    def snapshot(self) -> dict:
        """What STATS answers: links, this engine's and the core's counters, the error counts
        the ledger reads, and the core's own snapshot."""
        return {"name": self.name, "role": self.role,
                "links": {n: l.counters() for n, l in self.links.items()},
                "runtime": self.stats.snapshot(),
                "errors": {"by_vgpu": {str(k): v for k, v in self.errors_by_vgpu.items()},
                           "internal": list(self.internal_errors)},
                "stats": self.core.stats.snapshot(),
                "core": self.core.snapshot()}

    def serve(self, kinds: Iterable[str], handler: Handler) -> None:
        """Route these kinds to `handler` instead of the core (control, the memory fabric)."""
        for k in kinds:
            self.handlers[k] = handler

    # ---- links ---------------------------------------------------------------------------------
    def add_link(self, link: Link) -> None:
        self.links[link.name] = link

    def drop_link(self, name: str, now: int, why: str = "went away") -> None:
        """Forget a peer (a new incarnation replaced it); its calls in flight fail."""
        link = self.links.pop(name, None)
        if link is not None:
            self.link_lost(name, why, now, event="replaced", role=link.role)

    def link_lost(self, name: str, why: str, now: int, event: str = "silent",
                  role: str = "") -> None:
        """The peer restarted, went silent or was replaced: what it was asked and has not
        answered has an unknown outcome (ECONNRESET), and what it asked of us is forgotten (an
        answer would reach a stream that no longer expects it). The core hears of it
        (peer_event, unless `event` is empty: the caller tells it), before anything the peer's
        next incarnation sends."""
        self.sched.fail_calls(lambda key: key[0] == name,
                              OutcomeUnknown("ECONNRESET", f"{name} {why} with the request "
                                             f"unanswered"), now)
        link = self.links.get(name)
        if link is not None:
            link.outstanding = 0
            role = role or link.role
        if event:
            self.peer_event(name, role, event, why, now)

    def peer_event(self, name: str, role: str, event: str, why: str, now: int) -> None:
        """Tell the core a peer restarted, was replaced by a new incarnation, went silent or
        returned (its hook emits what follows: recovery runs as tasks, Spawned in lanes where
        it must come before new work)."""
        if self._peer_event is None or role == "launcher":
            return
        try:
            self._peer_event(name, role, event, why, now)
        except Exception as err:        # our own bug: counted, and the node goes on
            self.note_error(err, 0)
        self._run_outbox(now)

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
        if env.trace and link.role == "guest" and env.trace >> 40 != link.vm:
            env.trace = 0               # another VM's operation: a guest names only its own
        if env.trace and self.trace_spans:
            span = origin.span = self._open(kind, env.vgpu or (lane if type(lane) is int else 0),
                                            env.trace, now, "handle")
            if span is not None:
                span.ins.append((link.name, env.seq, now, kind))
        if lane is None:
            self._handle(origin, None, now)
        else:
            sched = self.sched
            if sched.lane_idle(lane):   # submit() would start it now: no closure to make
                self._handle(origin, lane, now)
            else:
                sched.submit(lane, lambda t: self._handle(origin, lane, t), now)

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
        if self.core.outbox:
            self._ctx = origin.span     # what the core queued now may belong to this message's span
            try:
                self._run_outbox(now)
            finally:
                self._ctx = None
        if isinstance(result, GeneratorType):
            self.sched.spawn(result, now, origin, lane, origin.span)
        elif env.flags & FLAG_WANT_REPLY or env.kind in self._observed:
            self.finish(origin, result, None, now)
        elif origin.span is not None:   # a traced posted message handled at once
            self._close(origin.span, self.clock())
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
        traced = self._calls.pop(key, None) if self._calls else None
        if traced is None:
            self.sched.resume(key, value, exc, now)
            return
        span, own = traced
        _hop(span.ins, link.name, env.seq, now, env.kind)
        self.sched.resume(key, value, exc, now)
        if own:                         # a call's own span ends once its answer was handled
            self._close(span, self.clock())

    # ---- TaskIO: what tasks send -----------------------------------------------------------------
    def _link_to(self, peer: str, kind: str) -> Link:
        link = self.links.get(peer)
        if link is None:
            raise GvtError("EHOSTUNREACH", f"{self.name} has no link to {peer!r}")
        state = link.proto.state
        if state is not State.OPEN and state is not State.HELLO_SENT and kind != "HELLO":
            # re-opening (the peer restarted or returned, no HELLO yet) or dead: a definite
            # refusal now, not a message the peer's new incarnation would refuse or run unasked.
            # Behind a HELLO in flight a message may go: the peer takes the HELLO first
            raise GvtError("ENOTCONN", f"the link to {peer} is {state.value}: "
                           + ("it says HELLO again" if state is not State.DEAD
                              else "its peer went silent"))
        return link

    def send_call(self, call: Call, now: int) -> Hashable:
        link = self._link_to(call.peer, call.kind)
        seq = link.tx_seq + 1
        trace, span = self._resolve(call.trace) if self.trace_spans else (0, None)
        t = self.clock()
        link.send_frame(encode(call.kind, seq, 0, call.vgpu, t, FLAG_WANT_REPLY, call.payload, trace),
                        seq, self.max_frame, now)
        key = (link.name, seq)
        if trace:
            own = span is None          # no open span of its operation: the call is a stage
            if own:
                span = self._open(call.kind, call.vgpu, trace, t, "call")
            if span is not None:
                _hop(span.outs, link.name, seq, t, call.kind)
                if len(self._calls) >= self._calls_prune_at:
                    self._forget_calls()
                self._calls[key] = (span, own)
        return key

    def send_post(self, post: Post, now: int) -> None:
        try:
            link = self._link_to(post.peer, post.kind)
        except GvtError as err:
            if err.code == "ENOTCONN" and post.peer in self._restored:
                self.stats.inc("gvtbench_posts_while_down", (post.peer,))
                return
            raise
        seq = link.tx_seq + 1
        trace, span = self._resolve(post.trace) if self.trace_spans else (0, None)
        t = self.clock()
        link.send_frame(encode(post.kind, seq, 0, post.vgpu, t, 0, post.payload, trace), seq,
                        self.max_frame, now)
        if trace:
            own = span is None          # no open span of its operation: the send is a stage
            if own:
                span = self._open(post.kind, post.vgpu, trace, t, "post")
            if span is not None:
                _hop(span.outs, link.name, seq, t, post.kind)
                if own:
                    self._close(span, self.clock())

    def note_error(self, err: BaseException, vgpu: int) -> None:
        """A request or task of this node failed: by vGPU and errno; an exception that is not a
        GvtError is this node's own bug."""
        code = _code(err)
        per = self.errors_by_vgpu.setdefault(vgpu, {})
        per[code] = per.get(code, 0) + 1
        if not isinstance(err, GvtError):
            self.stats.inc("gvtbench_internal_errors")
            if len(self.internal_errors) < 16:
                tb = err.__traceback__
                while tb is not None and tb.tb_next is not None:
                    tb = tb.tb_next
                where = f" at {tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}" if tb else ""
                self.internal_errors.append(f"{type(err).__name__}: {err}{where}")

    def finish(self, origin: Origin | None, result: Any, err: BaseException | None, now: int) -> None:
        if err is not None:
            self.note_error(err, origin.env.vgpu if origin is not None else 0)
        if origin is None:
            if err is not None:
                self.stats.inc("gvtbench_handler_errors", (_code(err),))
            return
        span = origin.span
        try:
            self._answer(origin, result, err, now)
        finally:
            if span is not None:
                self._close(span, self.clock())

    def _answer(self, origin: Origin, result: Any, err: BaseException | None, now: int) -> None:
        link, env = origin.link, origin.env
        if err is None and env.kind in self._observed:
            self._observe(env, result, self.clock() - origin.t0)
        if not env.wants_reply:
            if err is not None:
                self.stats.inc("gvtbench_handler_errors", (_code(err),))
            return
        if origin.gen != link.proto.rx_gen or self.links.get(link.name) is not link:
            self.stats.inc("gvtbench_stale_replies")    # the peer that asked is gone
            return
        link.outstanding -= 1
        if err is None:
            try:
                seq = link.tx_seq + 1
                t = self.clock()
                link.send_frame(encode_reply(seq, env.seq, env.vgpu, t, result), seq,
                                self.max_frame, now)
                if origin.span is not None:
                    _hop(origin.span.outs, link.name, seq, t, "REPLY")
                return
            except SendFailed as failed:
                if failed.code != "E2BIG":
                    self._dropped(failed)
                    return
                err = failed
            except Exception as bad:    # a result msgpack cannot carry: a bug, answered as EIO
                err = bad
        sent = link.tx_seq
        self.send_error(link, env, err)
        if origin.span is not None and link.tx_seq != sent:
            _hop(origin.span.outs, link.name, link.tx_seq, self.clock(), "ERROR")

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

    # ---- spans ------------------------------------------------------------------------------------
    def _resolve(self, trace: int | None) -> tuple[int, Span | None]:
        """The trace id a message goes with, and the open span of that operation to note it in
        (None: it needs a span of its own). A task's message without an id of its own goes with
        its task's; a message the core queued outside a task goes with the id it names only."""
        task = self.sched.current
        if task is not None:
            span = task.span
            if trace is None:
                trace = span.trace if span is not None else 0
        else:
            span = self._ctx
            if trace is None:
                trace = 0
        if not trace:
            return 0, None
        return trace, (span if span is not None and span.trace == trace else None)

    def _full(self) -> bool:
        """No room for one more span: it is counted as dropped."""
        if len(self.spans) < self.trace_spans:
            return False
        self.spans_dropped += 1
        self.stats.inc("gvtbench_trace_spans", ("dropped",))
        return True

    def _open(self, name: str, vgpu: int, trace: int, t0: int, kind: str) -> Span | None:
        return None if self._full() else Span(name, vgpu, trace, t0, kind)

    def _close(self, span: Span, t1: int) -> None:
        if self._full():            # others closed first filled the buffer
            return
        self.spans.append((span.t0, t1, span.vgpu, span.name, span.trace, span.kind, span.ins,
                           span.outs))
        self.stats.inc("gvtbench_trace_spans", ("kept",))

    def _forget_calls(self) -> None:
        """Traced calls that timed out or whose link dropped are never answered: forget them.
        The next look is when twice as many as are left are remembered (each look is linear)."""
        for key in [k for k in self._calls if self.sched.call_waiting(k) is None]:
            del self._calls[key]
        self._calls_prune_at = max(_CALLS_PRUNE, 2 * len(self._calls))

    def span_for(self, spawn: Spawn, now: int) -> Span | None:
        """The span of a traced Spawn's task (the scheduler asks; the task closes it)."""
        if not self.trace_spans:
            return None
        lane = spawn.lane
        return self._open(spawn.span or "task", spawn.vgpu or (lane if type(lane) is int else 0),
                          spawn.trace, self.clock(), "task")

    def end_span(self, span: Span) -> None:
        self._close(span, self.clock())

    def trace_page(self, start: int) -> dict:
        """TRACE_DUMP: spans from `start` (at most TRACE_PAGE, and no more than half a frame
        holds), how many there are, how many were dropped."""
        page, size = [], 0
        for s in self.spans[start:start + TRACE_PAGE]:
            size += _SPAN_BYTES + len(s[3]) + _HOP_BYTES * (len(s[6]) + len(s[7]))
            if page and size > self.max_frame // 2:
                break
            page.append(s)
        return {"spans": page, "total": len(self.spans), "dropped": self.spans_dropped}

    # ---- core actions and time -----------------------------------------------------------------------
    def run_actions(self, actions: Iterable[Any] | None, now: int) -> None:
        """Actions a core emitted: Posts, tasks (Spawns, or bare generators), Signals."""
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
                    self.note_error(err, a.vgpu)
            elif type(a) is Signal:
                self.sched.signal(a.event, now)
            elif type(a) is Spawn:
                self.sched.spawn_in(a, now)
            elif isinstance(a, GeneratorType):
                self.sched.spawn(a, now)
            else:
                raise TypeError(f"a core returned {type(a).__name__} as an action")

    def _run_outbox(self, now: int) -> None:
        if self.core.outbox:
            self.run_actions(self.core.take_actions(), now)

    def step(self, now: int) -> None:
        """After each drain of the sockets: yielded tasks and queued lanes get their turn, then
        timeouts, then the core's tick."""
        self.sched.run_ready(now)
        self.sched.expire(now)
        if self._tick is not None:
            self._tick(now)
        self._run_outbox(now)       # what the tick emitted, and what tasks did since

    def next_wake(self, now: int) -> int | None:
        w = self.sched.next_wake()
        if self._core_wake is not None:
            c = self._core_wake(now)
            if c is not None:
                w = c if w is None else min(w, c)
        return w


def _code(err: BaseException) -> str:
    return label_code(err.code) if isinstance(err, GvtError) else "EIO"
