"""The thin runtime shared by every role: sockets, the poll loop, timers and the metrics endpoint.

A role's logic is a sans-IO core object:
    core.handle(msg, now)  -> a reply value, or a task (generator)
    core.lane(msg)         -> optional key; messages of one lane are handled one at a time, in order
    core.tick(now)         -> actions to run after each drain of the sockets (flushes, load)
    core.next_wake(now)    -> optional monotonic ns at which tick wants to run again
    core.outbox            -> optional list of actions queued by handle(), run before its task
    core.stats             -> nodes.stats.Stats, exported on /metrics and in STATS replies
A task is a generator that yields Call (send a request, resume with its result or an exception),
Post (send a one-way message, resume at once) or Sleep; its return value is the reply.
"""
from __future__ import annotations

import ctypes
import heapq
import select
import signal
import time
from collections import deque
from dataclasses import dataclass
from types import GeneratorType
from typing import Any, Callable, Hashable, Iterable

import zmq
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from nodes.errors import GvtError
from nodes.stats import LogHistogram, Stats
from nodes.wire.codec import (
    FLAG_WANT_REPLY, MAX_FRAME, PROTOCOL_VERSION, Envelope, RemoteError, WireError, decode, encode,
    encode_error, encode_reply,
)

monotonic_ns = time.monotonic_ns
DEFAULT_TIMEOUT_S = 10.0
DRAIN_BATCH = 512


@dataclass(slots=True)
class Call:
    """A request from a task: resumes with the peer's result, or raises RemoteError/CallTimeout."""
    peer: str
    kind: str
    payload: Any = None
    vgpu: int = 0
    timeout: float = DEFAULT_TIMEOUT_S


@dataclass(slots=True)
class Post:
    """A one-way message: no reply, ordered with everything else on its link."""
    peer: str
    kind: str
    payload: Any = None
    vgpu: int = 0


@dataclass(slots=True)
class Sleep:
    """Resume the task after this many seconds."""
    seconds: float


class CallTimeout(GvtError):
    def __init__(self, peer: str, kind: str, timeout: float):
        super().__init__("ETIMEDOUT", f"{peer} did not answer {kind} within {timeout:g} s")


class Link:
    """One peer: a DEALER we connected, or an identity on our ROUTER. Counts for conservation."""

    __slots__ = ("name", "role", "sock", "ident", "tx_seq", "rx_seq", "sent", "received",
                 "gaps", "dups", "ready")

    def __init__(self, name: str, sock: zmq.Socket, ident: bytes | None):
        self.name, self.sock, self.ident = name, sock, ident
        self.role = ""
        self.tx_seq = 0
        self.rx_seq = 0
        self.sent = 0
        self.received = 0
        self.gaps = 0       # sequence numbers never seen: messages lost on the way to us
        self.dups = 0
        self.ready = ident is not None

    def send(self, frame: bytes) -> None:
        if self.ident is None:
            self.sock.send(frame)
        else:
            self.sock.send_multipart((self.ident, frame))
        self.sent += 1

    def next_seq(self) -> int:
        self.tx_seq += 1
        return self.tx_seq

    def note_rx(self, seq: int) -> None:
        self.received += 1
        if seq == self.rx_seq + 1:
            self.rx_seq = seq
        elif seq > self.rx_seq:
            self.gaps += seq - self.rx_seq - 1
            self.rx_seq = seq
        else:
            self.dups += 1

    def counters(self) -> dict:
        return {"sent": self.sent, "received": self.received, "gaps": self.gaps, "dups": self.dups,
                "tx_seq": self.tx_seq, "rx_seq": self.rx_seq}


class _Task:
    __slots__ = ("gen", "origin", "lane")

    def __init__(self, gen: GeneratorType, origin: Envelope | None, lane: Hashable | None):
        self.gen, self.origin, self.lane = gen, origin, lane


def die_with_parent() -> None:
    """Ask Linux to SIGTERM us when the launcher dies, so no node outlives a crashed run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)       # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Runtime:
    def __init__(self, name: str, role: str, core: Any, bind: str, *,
                 max_frame: int = MAX_FRAME, hwm: int = 200_000, send_timeout_ms: int = 5000,
                 limits: dict | None = None):
        self.name, self.role, self.core = name, role, core
        self.max_frame = max_frame
        self.limits = limits or {}
        self.ctx = zmq.Context()
        self.router = self._socket(zmq.ROUTER, hwm, send_timeout_ms)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(bind)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._fd_cache: list[int] = []
        self._poller = zmq.Poller()
        self._poller.register(self.router, zmq.POLLIN)
        self._hwm, self._send_timeout_ms = hwm, send_timeout_ms
        self.links: dict[str, Link] = {}
        self._by_ident: dict[bytes, Link] = {}
        self._dealers: dict[zmq.Socket, Link] = {}
        self._pending: dict[tuple[str, int], tuple[_Task, Call]] = {}
        self._deadlines: list[tuple[int, str, int]] = []
        self._lanes_busy: set[Hashable] = set()
        self._lane_queue: dict[Hashable, deque[Envelope]] = {}
        self._sleep_seq = 0
        self.stopping = False
        self.on_stop: list[Callable[[], None]] = []
        self.rstats = Stats()
        self.rstats.counter("gvtbench_bad_frames", "Frames refused as malformed, by reason", ["reason"])
        self.rstats.counter("gvtbench_handler_errors", "Requests answered with an error, by code", ["code"])
        self.metrics_port: int | None = None
        self._http = None

    def _socket(self, kind: int, hwm: int, send_timeout_ms: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, hwm)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        return s

    # ---- links ---------------------------------------------------------------------------
    def connect(self, peer: str, endpoint: str) -> Link:
        """A DEALER to a peer's ROUTER; the HELLO handshake runs as a task (see hello_task)."""
        s = self._socket(zmq.DEALER, self._hwm, self._send_timeout_ms)
        s.setsockopt(zmq.IDENTITY, self.name.encode())
        s.connect(endpoint)
        link = Link(peer, s, None)
        self.links[peer] = link
        self._dealers[s] = link
        self._poller.register(s, zmq.POLLIN)
        return link

    def hello_task(self, peers: Iterable[str]):
        """Handshake with each peer: version check both ways, limits exchanged."""
        for peer in peers:
            info = yield Call(peer, "HELLO", self._hello_payload(), timeout=30.0)
            if not isinstance(info, dict) or info.get("version") != PROTOCOL_VERSION:
                raise GvtError("EPROTO", f"peer {peer} speaks protocol "
                               f"{info.get('version') if isinstance(info, dict) else '?'}, "
                               f"this node speaks {PROTOCOL_VERSION}")
            link = self.links[peer]
            link.role = info.get("role", "")
            link.ready = True
        return True

    def _hello_payload(self) -> dict:
        return {"name": self.name, "role": self.role, "version": PROTOCOL_VERSION,
                "max_frame": self.max_frame, **self.limits}

    def _on_hello(self, ident: bytes, env: Envelope) -> None:
        p = env.payload
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
            self._refuse(self.router, ident, env.seq, "EINVAL", "HELLO needs a map with a name")
            return
        if p.get("version") != PROTOCOL_VERSION:
            self._count_bad("version")
            self._refuse(self.router, ident, env.seq, "EPROTO",
                         f"protocol version mismatch: peer speaks {p.get('version')!r}, "
                         f"{self.name} speaks {PROTOCOL_VERSION}")
            return
        name = p["name"]
        link = self._by_ident.get(ident)
        if link is None:
            if name in self.links:
                self._refuse(self.router, ident, env.seq, "EEXIST",
                             f"a peer named {name!r} is already connected")
                return
            link = Link(name, self.router, ident)
            self.links[name] = link
            self._by_ident[ident] = link
        link.role = p.get("role", "")
        link.note_rx(env.seq)
        link.send(encode_reply(link.next_seq(), env.seq, 0, monotonic_ns(), self._hello_payload()))

    def _refuse(self, sock: zmq.Socket, ident: bytes | None, reply_to: int, code: str, text: str):
        """An error answer on a connection that is not (yet) a link (no per-link seq to use)."""
        frame = encode_error(1, reply_to, 0, monotonic_ns(), code, text)
        try:
            if ident is None:
                sock.send(frame, zmq.NOBLOCK)
            else:
                sock.send_multipart((ident, frame), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _count_bad(self, reason: str) -> None:
        self.rstats.inc("gvtbench_bad_frames", (reason,))

    # ---- sending ---------------------------------------------------------------------------
    def _link(self, peer: str) -> Link:
        link = self.links.get(peer)
        if link is None:
            raise GvtError("ENOTCONN", f"{self.name} has no link to {peer!r}")
        return link

    def post(self, peer: str, kind: str, payload: Any = None, vgpu: int = 0) -> None:
        link = self._link(peer)
        link.send(encode(kind, link.next_seq(), 0, vgpu, monotonic_ns(), 0, payload))

    def _send_call(self, task: _Task, call: Call) -> None:
        link = self._link(call.peer)
        seq = link.next_seq()
        link.send(encode(call.kind, seq, 0, call.vgpu, monotonic_ns(), FLAG_WANT_REPLY, call.payload))
        self._pending[(link.name, seq)] = (task, call)
        deadline = monotonic_ns() + int(call.timeout * 1e9)
        heapq.heappush(self._deadlines, (deadline, link.name, seq))

    def _reply(self, origin: Envelope, result: Any) -> None:
        link = self.links.get(origin.peer)
        if link is not None:
            link.send(encode_reply(link.next_seq(), origin.seq, origin.vgpu, monotonic_ns(), result))

    def _reply_error(self, origin: Envelope, exc: BaseException) -> None:
        code = getattr(exc, "code", None) or "EIO"
        text = getattr(exc, "text", None) or f"{type(exc).__name__}: {exc}"
        self.rstats.inc("gvtbench_handler_errors", (code,))
        link = self.links.get(origin.peer)
        if link is not None:
            link.send(encode_error(link.next_seq(), origin.seq, origin.vgpu, monotonic_ns(), code, text))

    # ---- tasks -------------------------------------------------------------------------------
    def spawn(self, gen: GeneratorType, origin: Envelope | None = None,
              lane: Hashable | None = None) -> None:
        task = _Task(gen, origin, lane)
        if lane is not None:
            self._lanes_busy.add(lane)
        self._step(task, None, None)

    def _step(self, task: _Task, value: Any, exc: BaseException | None) -> None:
        gen = task.gen
        while True:
            try:
                action = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                self._finish(task, stop.value, None)
                return
            except Exception as err:        # a failing task never takes the node down
                self._finish(task, None, err)
                return
            value, exc = None, None
            try:
                if type(action) is Post:
                    self.post(action.peer, action.kind, action.payload, action.vgpu)
                elif type(action) is Call:
                    self._send_call(task, action)
                    return
                elif type(action) is Sleep:
                    self._sleep_seq += 1
                    key = ("", -self._sleep_seq)
                    self._pending[key] = (task, None)
                    heapq.heappush(self._deadlines, (monotonic_ns() + int(action.seconds * 1e9), *key))
                    return
                else:
                    raise GvtError("EINVAL", f"task yielded {type(action).__name__}, not Call/Post")
            except (GvtError, zmq.ZMQError) as err:
                exc = err if isinstance(err, GvtError) else GvtError(
                    "EHOSTUNREACH", f"send to {getattr(action, 'peer', '?')} failed: {err}")

    def _finish(self, task: _Task, result: Any, err: BaseException | None) -> None:
        origin = task.origin
        if origin is not None and origin.wants_reply:
            try:
                if err is None:
                    self._reply(origin, result)
                else:
                    self._reply_error(origin, err)
            except zmq.ZMQError:
                pass
        elif err is not None:
            self._count_failure(err)
        if task.lane is not None:
            self._lanes_busy.discard(task.lane)
            queue = self._lane_queue.get(task.lane)
            while queue and task.lane not in self._lanes_busy:
                self._run_handler(queue.popleft(), task.lane)

    def _count_failure(self, err: BaseException) -> None:
        """A failure nobody waits for (a posted message, a task with no requester): counted."""
        self.rstats.inc("gvtbench_handler_errors", (getattr(err, "code", None) or "EIO",))

    def _run_actions(self, actions: Iterable[Any] | None) -> None:
        if not actions:
            return
        for a in actions:
            if type(a) is Post:
                try:
                    self.post(a.peer, a.kind, a.payload, a.vgpu)
                except (GvtError, zmq.ZMQError) as err:
                    self._count_failure(err)
            elif isinstance(a, GeneratorType):
                self.spawn(a)

    # ---- receiving ---------------------------------------------------------------------------
    def _on_frame(self, link: Link | None, ident: bytes | None, frame: bytes) -> None:
        try:
            env = decode(frame, self.max_frame)
        except WireError as err:
            self._count_bad(err.code)
            if link is not None:
                try:
                    link.send(encode_error(link.next_seq(), err.seq, 0, monotonic_ns(), err.code, err.text))
                except zmq.ZMQError:
                    pass
            else:
                self._refuse(self.router, ident, err.seq, err.code, err.text)
            return
        if link is None:
            if env.kind == "HELLO":
                self._on_hello(ident, env)
            else:
                self._count_bad("no_hello")
                self._refuse(self.router, ident, env.seq, "EPROTO",
                             f"{env.kind} before HELLO: say HELLO with protocol version first")
            return
        link.note_rx(env.seq)
        env.peer = link.name
        kind = env.kind
        if kind == "REPLY" or kind == "ERROR":
            entry = self._pending.pop((link.name, env.reply_to), None)
            if entry is None:
                return      # a reply after its timeout: the task has moved on
            task, call = entry
            if kind == "REPLY":
                self._step(task, env.payload, None)
            else:
                p = env.payload if isinstance(env.payload, dict) else {}
                self._step(task, None, RemoteError(str(p.get("code", "EIO")), str(p.get("text", "")),
                                                   link.name, call.kind))
            return
        if kind == "HELLO":         # a repeated HELLO on a live link: answer again
            link.send(encode_reply(link.next_seq(), env.seq, 0, monotonic_ns(), self._hello_payload()))
            return
        if kind == "STATS":
            self._reply(env, self.snapshot())
            return
        if kind == "SHUTDOWN":
            self._reply(env, True)
            self.stopping = True
            return
        lane_fn = getattr(self.core, "lane", None)
        lane = lane_fn(env) if lane_fn is not None else None
        if lane is not None and lane in self._lanes_busy:
            self._lane_queue.setdefault(lane, deque()).append(env)
            return
        self._run_handler(env, lane)

    def _run_handler(self, env: Envelope, lane: Hashable | None) -> None:
        try:
            result = self.core.handle(env, monotonic_ns())
        except Exception as err:
            if env.wants_reply:
                self._reply_error(env, err)
            else:
                self._count_failure(err)
            return
        outbox = getattr(self.core, "outbox", None)
        if outbox:
            # work the handler queued (a flush of posted writes) goes out before its own task
            self.core.outbox = []
            self._run_actions(outbox)
        if isinstance(result, GeneratorType):
            self.spawn(result, env, lane)
        elif env.wants_reply:
            self._reply(env, result)

    def _drain(self, sock: zmq.Socket) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if sock is self.router:
                ident = parts[0]
                if len(parts) != 2:
                    self._count_bad("multipart")
                    self._refuse(self.router, ident, 0, "EBADMSG", "one frame per message")
                    continue
                self._on_frame(self._by_ident.get(ident), ident, parts[1])
            else:
                link = self._dealers[sock]
                if len(parts) != 1:
                    self._count_bad("multipart")
                    continue
                self._on_frame(link, None, parts[0])

    def _expire(self, now: int) -> None:
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            _, peer, seq = heapq.heappop(dl)
            entry = self._pending.pop((peer, seq), None)
            if entry is not None:
                task, call = entry
                if call is None:        # a Sleep ran out
                    self._step(task, None, None)
                else:
                    self._step(task, None, CallTimeout(peer, call.kind, call.timeout))

    # ---- loop ------------------------------------------------------------------------------
    def run(self, until: Callable[[], bool] | None = None) -> None:
        core = self.core
        tick = getattr(core, "tick", None)
        next_wake = getattr(core, "next_wake", None)
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        try:
            while not self.stopping and not (until and until()):
                # zmq_poll sleeps in whole milliseconds, which would add up to 1 ms of timer
                # lateness to an open-loop schedule; select() on the sockets' signalling fds
                # sleeps to the microsecond. The fds are edge-triggered, so zmq_poll(0) asks
                # for pending input before sleeping, and every ready socket is drained.
                ready = self._poller.poll(0)        # zmq_poll in C: cheap, no enum boxing
                if not ready:
                    now = monotonic_ns()
                    wake = now + 100_000_000
                    if self._deadlines:
                        wake = min(wake, self._deadlines[0][0])
                    if next_wake is not None:
                        w = next_wake(now)
                        if w is not None:
                            wake = min(wake, w)
                    if wake > now:
                        try:
                            select.select(self._fds, (), (), (wake - now) / 1e9)
                        except InterruptedError:
                            pass
                    ready = self._poller.poll(0)
                for sock, _ev in ready:
                    self._drain(sock)
                now = monotonic_ns()
                if self._deadlines and self._deadlines[0][0] <= now:
                    self._expire(now)
                if tick is not None:
                    self._run_actions(tick(now))
        finally:
            for fn in self.on_stop:
                try:
                    fn()
                except Exception:
                    pass

    @property
    def _fds(self) -> list[int]:
        if len(self._fd_cache) != 1 + len(self._dealers):
            self._fd_cache = [s.getsockopt(zmq.FD) for s in (self.router, *self._dealers)]
        return self._fd_cache

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.ctx.destroy(linger=0)

    # ---- observability -----------------------------------------------------------------------
    def snapshot(self) -> dict:
        snap_fn = getattr(self.core, "snapshot", None)
        return {"name": self.name, "role": self.role,
                "links": {n: l.counters() for n, l in self.links.items()},
                "runtime": self.rstats.snapshot(),
                "stats": self.core.stats.snapshot(),
                "core": snap_fn() if snap_fn else {}}

    def serve_metrics(self, addr: str = "127.0.0.1", port: int = 0) -> int:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_StatsCollector(self, self.core.stats))
        registry.register(_StatsCollector(self, self.rstats))
        registry.register(_LinkCollector(self))
        server, _thread = start_http_server(port, addr=addr, registry=registry)
        self._http = server
        self.metrics_port = server.server_port
        return self.metrics_port


class _StatsCollector:
    def __init__(self, rt: Runtime, stats: Stats):
        self.rt, self.stats = rt, stats

    def collect(self):
        for fam in list(self.stats.families.values()):
            rows = list(fam.values.items())
            labels = list(fam.labels)
            if fam.type == "histogram":
                m = HistogramMetricFamily(fam.name, fam.help, labels=labels)
                for lv, h in rows:
                    assert isinstance(h, LogHistogram)
                    m.add_metric([str(v) for v in lv], h.prom_buckets(), h.total_ns / 1e9)
            elif fam.type == "counter":
                m = CounterMetricFamily(fam.name, fam.help, labels=labels)
                for lv, v in rows:
                    m.add_metric([str(x) for x in lv], v)
            else:
                m = GaugeMetricFamily(fam.name, fam.help, labels=labels)
                for lv, v in rows:
                    m.add_metric([str(x) for x in lv], v)
            yield m


class _LinkCollector:
    def __init__(self, rt: Runtime):
        self.rt = rt

    def collect(self):
        sent = CounterMetricFamily("gvtbench_link_messages", "Messages on a link, by peer and direction",
                                   labels=["peer", "direction"])
        gaps = CounterMetricFamily("gvtbench_link_lost_messages",
                                   "Sequence numbers a peer sent that never arrived", labels=["peer"])
        for name, link in list(self.rt.links.items()):
            sent.add_metric([name, "tx"], link.sent)
            sent.add_metric([name, "rx"], link.received)
            gaps.add_metric([name], link.gaps)
        yield sent
        yield gaps
        pend = GaugeMetricFamily("gvtbench_pending_calls", "Requests awaiting a reply")
        pend.add_metric([], len(self.rt._pending))
        yield pend

