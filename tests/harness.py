"""Sans-IO test bench: real cores in real NodeEngines, wired by an in-memory network.

Every frame goes through the real codec and schemas and is delivered in the order it was sent;
tasks run on the real scheduler (nodes.tasks), the same one the runtime uses. Time is virtual:
when nothing is in flight the clock jumps to the next deadline. Nothing under test is mocked.

    net = SimNet(vgpus=[1, 2])
    net.add("gpu", GpuSim(...)); net.connect("mediator", "gpu")
    value = net.call("hypervisor", "mediator", "TRAP_READ", {"off": ..., "size": 4}, vgpu=1)
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from nodes.actions import Call, Post
from nodes.core import Core
from nodes.engine import NodeEngine
from nodes.errors import GvtError, WireError
from nodes.gpu.sim import GpuSim
from nodes.guest.core import GuestCore, LoadSpec
from nodes.hw import gtt, partition, pvinfo, regs
from nodes.hypervisor.core import HypervisorCore
from nodes.mediator.core import MediatorCore
from nodes.mediator.translate import translate_entries
from nodes.memory import Fabric, Layout, OwnedMemory, RegionMemory
from nodes.wire.codec import PROTOCOL_VERSION, Envelope, decode
from nodes.wire.link import Link
from nodes.wire.schema import pack_write_batch, role_of

HOST_POOL_FRAMES = 4096
VM_FRAMES = {1: 16384, 2: 16384}
SEED = 1234


class SimNet:
    """Frames go through each link's real LinkProtocol (header, checksum, acks) and arrive in
    the order they were sent; the messages they carry can be lost or held back by a test
    (`lose`, `hold`: above the link layer, so the protocol does not resend them). Liveness is
    off (virtual time jumps), unless a test sets `dead_ns`."""

    def __init__(self, vgpus: Iterable[int] = (1, 2), start_ns: int = 1_000_000_000,
                 dead_ns: int = 1 << 62):
        self.vgpus = list(vgpus)
        self.now = start_ns
        self.dead_ns = dead_ns
        self.engines: dict[str, NodeEngine] = {}
        self.frames: deque[tuple[str, str, bytes]] = deque()
        self.ready: deque[tuple[str, str, bytes]] = deque()     # messages the links handed up
        self.log: list[tuple[str, str, Envelope]] = []
        self.lose: Callable[[str, str, Envelope], bool] | None = None    # messages the network loses
        self.hold: Callable[[str, str, Envelope], bool] | None = None    # messages it keeps back
        self.held: list[tuple[str, str, bytes]] = []
        self._epochs = 0

    def clock(self) -> int:
        return self.now

    def add(self, name: str, core: Any, services: dict[Iterable[str], Callable] | None = None,
            trace_spans: int = 0) -> NodeEngine:
        e = NodeEngine(name, role_of(name)[0], core, vgpus=self.vgpus, clock=self.clock,
                       trace_spans=trace_spans)
        for kinds, handler in (services or {}).items():
            e.serve(kinds, handler)
        self.engines[name] = e
        return e

    def connect(self, a: str, b: str, control: bool = False) -> tuple[Link, Link]:
        """`a` connects to `b` (as a DEALER to b's ROUTER): a link on each side."""
        def sender(src: str, dst: str) -> Callable[[bytes], None]:
            return lambda frame: self.frames.append((src, dst, frame))
        self._epochs += 2
        la = Link(b, sender(a, b), control=control, max_outstanding=1 << 20,
                  epoch=self._epochs, now=self.now, dead_ns=self.dead_ns)
        lb = Link(a, sender(b, a), max_outstanding=1 << 20, epoch=self._epochs + 1, now=self.now,
                  dead_ns=self.dead_ns)
        la.version = lb.version = PROTOCOL_VERSION
        la.proto.hello_sent()               # the handshake is taken as done: no HELLO here
        la.proto.hello_answered()
        lb.proto.hello_accepted()
        self.engines[a].add_link(la)
        self.engines[b].add_link(lb)
        return la, lb

    def _links(self) -> Iterator[Link]:
        for e in self.engines.values():
            yield from e.links.values()

    def run(self, until: Callable[[], bool] | None = None, max_steps: int = 1_000_000,
            advance: bool = True) -> None:
        """Deliver frames and step every engine until `until()` holds or nothing is left to do
        (with `advance`, idle time jumps to the next deadline; the links' acks and resends
        count, their heartbeats do not)."""
        for _ in range(max_steps):
            while self.frames or self.ready:
                if not self.ready:
                    src, dst, frame = self.frames.popleft()
                    link = self.engines[dst].links.get(src)
                    if link is not None:
                        self.ready.extend((src, dst, body) for body in link.receive(frame, self.now))
                    continue
                src, dst, body = self.ready.popleft()
                eng = self.engines[dst]
                try:
                    env = decode(body)
                except WireError as err:        # as the runtime does: counted and answered
                    eng.stats.inc("gvtbench_bad_frames", (err.code,))
                    eng.links[src].note_rx(err.seq or eng.links[src].rx_seq + 1, self.now)
                    eng.send_error(eng.links[src], Envelope("?", err.seq or 1, 0, 0, 0, 1, None), err)
                    continue
                if self.lose is not None and self.lose(src, dst, env):
                    continue
                if self.hold is not None and self.hold(src, dst, env):
                    self.held.append((src, dst, body))
                    continue
                self.log.append((src, dst, env))
                eng.deliver(eng.links[src], env, self.now)
                if until is not None and until():
                    return
            for e in self.engines.values():
                e.step(self.now)
            for link in self._links():
                if link.proto.next_wake() <= self.now:
                    link.tick(self.now)
            if self.frames:
                continue
            if until is not None and until():
                return
            wakes = [w for e in self.engines.values() if (w := e.next_wake(self.now)) is not None]
            wakes += [w for link in self._links() if (w := link.proto.send_wake()) is not None]
            if not wakes or not advance:
                return
            self.now = max(self.now + 1, min(wakes))
        raise AssertionError("the network did not settle")

    def release(self) -> None:
        """The messages kept back arrive now, in the order they were sent, before anything else."""
        self.hold = None
        self.ready.extendleft(reversed(self.held))
        self.held = []

    def spawn(self, node: str, task: Any) -> dict:
        """Run a task on a node; returns a box that gets 'value' or 'error' when it ends."""
        box: dict = {}

        def wrapper() -> Any:
            try:
                box["value"] = yield from task
            except GvtError as err:
                box["error"] = err
        self.engines[node].sched.spawn(wrapper(), self.now)
        return box

    def call(self, src: str, dst: str, kind: str, payload: Any = None, vgpu: int = 0,
             timeout: float = 10.0) -> Any:
        """A request from node `src` to `dst`, run to its answer (a GvtError is raised)."""
        def task() -> Any:
            return (yield Call(dst, kind, payload, vgpu=vgpu, timeout=timeout))
        box = self.spawn(src, task())
        self.run(until=lambda: bool(box))
        if "error" in box:
            raise box["error"]
        assert box, f"{kind} from {src} to {dst} never ended"
        return box["value"]

    def post(self, src: str, dst: str, kind: str, payload: Any = None, vgpu: int = 0) -> None:
        def task() -> Any:
            yield Post(dst, kind, payload, vgpu=vgpu)
        self.spawn(src, task())
        self.run()

    def sent(self, kind: str, src: str | None = None, dst: str | None = None) -> list[Envelope]:
        return [e for s, d, e in self.log if e.kind == kind and src in (None, s) and dst in (None, d)]


# ---- a mediator with its real hypervisor and gpu ---------------------------------------------------
@dataclass
class Bench:
    net: SimNet
    layout: Layout
    mediator: MediatorCore
    hv: HypervisorCore
    gpu: GpuSim
    memories: list[RegionMemory] = field(default_factory=list)

    def setup(self, specs: list[tuple[int, str]]) -> Any:
        box = self.net.spawn("mediator", self.mediator.setup(specs))
        self.net.run(until=lambda: bool(box))
        if "error" in box:
            raise box["error"]
        return box["value"]

    def clear_log(self) -> None:
        self.net.log.clear()

    # guest accesses, as the hypervisor traps them
    def trap_read(self, vgpu: int, off: int, size: int) -> int:
        return self.net.call("hypervisor", "mediator", "TRAP_READ", {"off": off, "size": size}, vgpu)

    def trap_writes(self, vgpu: int, writes: Iterable[tuple[int, int, int]]) -> dict:
        writes = list(writes)
        payload = pack_write_batch([w[0] for w in writes], [w[1] for w in writes],
                                   [w[2] & 0xFFFFFFFFFFFFFFFF for w in writes])
        return self.net.call("hypervisor", "mediator", "TRAP_WRITE", payload, vgpu)

    def trap_write(self, vgpu: int, off: int, size: int, val: int) -> dict:
        return self.trap_writes(vgpu, [(off, size, val)])

    def ggtt_write(self, vgpu: int, index: int, entry: int) -> dict:
        return self.trap_write(vgpu, gtt.offset_of(index), 8, entry)

    def ggtt_write_half(self, vgpu: int, index: int, high: bool, dword: int) -> dict:
        return self.trap_write(vgpu, gtt.offset_of(index) + (4 if high else 0), 4, dword)

    def ggtt_read(self, vgpu: int, index: int) -> int:
        return self.trap_read(vgpu, gtt.offset_of(index), 8)

    def control(self, kind: str, payload: Any = None, vgpu: int = 0) -> Any:
        return self.net.call("launcher", "mediator", kind, payload, vgpu)

    # observations
    def phys(self, index: int) -> int:
        return int(self.gpu.ggtt[index])

    def calls_of(self, kind: str) -> list[Envelope]:
        return [e for e in self.net.sent(kind) if e.wants_reply]

    def posts_of(self, kind: str) -> list[Envelope]:
        return [e for e in self.net.sent(kind) if not e.wants_reply]

    def pinned_gfns_in_calls(self) -> list[int]:
        out: list[int] = []
        for c in self.calls_of("GFN_PIN"):
            out += np.frombuffer(c.payload["gfns"], dtype="<u8").tolist()
        return out

    def unpinned_gfns_in_posts(self) -> list[int]:
        out: list[int] = []
        for p in self.posts_of("GFN_UNPIN"):
            out += np.frombuffer(p.payload["gfns"], dtype="<u8").tolist()
        return out

    def p2m(self, vm: int) -> np.ndarray:
        return self.hv.vms[vm].p2m

    def ap_index(self, vgpu: int, k: int = 0) -> int:
        """GGTT index of the k-th page of the vGPU's aperture share."""
        return gtt.index_of_gm(self.mediator.vgpus[vgpu].part.aperture_base) + k

    def hi_index(self, vgpu: int, k: int = 0) -> int:
        """GGTT index of the k-th page of the vGPU's hidden share."""
        return gtt.index_of_gm(self.mediator.vgpus[vgpu].part.hidden_base) + k

    def close(self) -> None:
        for rm in self.memories:
            rm.close(unlink=False)


class Recorder(Core):
    """A peer that keeps what it is sent (a guest's view of WRITE_DONE and IRQ, say)."""
    def __init__(self) -> None:
        super().__init__()
        self.got: list[Envelope] = []

    def handle(self, msg: Envelope, now: int) -> Any:
        self.got.append(msg)
        return None

    def of(self, kind: str) -> list[dict]:
        return [m.payload for m in self.got if m.kind == kind]


class _Launcher(Core):
    """The launcher's end of control links: it answers nothing, it only asks."""
    def handle(self, msg: Envelope, now: int) -> Any:
        raise GvtError("ENOTSUP", f"the test launcher does not handle {msg.kind}")


def make_bench(*, translate: Callable[..., Any] = translate_entries,
               vm_frames: dict[int, int] | None = None, host_frames: int = HOST_POOL_FRAMES,
               aperture_size: int = 1024 << 20, max_vgpus: int = partition.GVT_MAX_VGPU - 1,
               seed: int = SEED, guests: Iterable[int] = (), call_timeout: float = 10.0,
               trace_spans: int = 0, scratch: str = "kernel", shadow_quota: int = 0,
               hang_timeout_ns: int | None = None, sched_policy: str = "timeslice",
               cost: Any = None) -> Bench:
    """A real mediator, hypervisor and gpu (and guests) on one Layout, with anonymous memory;
    with trace_spans, each records up to that many spans. The host's hang detection is off
    unless `hang_timeout_ns` is given (a test that holds an interrupt holds it for as long as it
    likes, and idle time jumps ahead); `cost`: the gpu's CostModel (default: its own)."""
    vm_frames = dict(VM_FRAMES if vm_frames is None else vm_frames)
    layout = Layout.build(host_frames, vm_frames)
    net = SimNet(vgpus=sorted(vm_frames))
    m_owned = OwnedMemory(layout)
    host_mem = RegionMemory.create(layout.host, "msg", "test")
    m_owned.add(host_mem)
    vms = {vm: RegionMemory.create(layout.vm_region(vm), "msg", "test") for vm in vm_frames}
    h_owned = OwnedMemory(layout)
    for rm in vms.values():
        h_owned.add(rm)
    mediator = MediatorCore(layout, Fabric(layout, "msg", "test", owned=m_owned),
                            aperture_size=aperture_size, max_vgpus=max_vgpus, translate=translate,
                            scratch=scratch, shadow_quota=shadow_quota,
                            hang_timeout_ns=hang_timeout_ns, sched_policy=sched_policy)
    hv = HypervisorCore(layout, vms, seed, call_timeout=call_timeout)
    gpu = GpuSim(Fabric(layout, "msg", "test"), cost=cost)
    net.add("gpu", gpu, trace_spans=trace_spans)
    net.add("mediator", mediator, {OwnedMemory.KINDS: m_owned.serve}, trace_spans=trace_spans)
    net.add("hypervisor", hv, {OwnedMemory.KINDS: h_owned.serve}, trace_spans=trace_spans)
    net.add("launcher", _Launcher())
    net.connect("mediator", "gpu")
    net.connect("hypervisor", "mediator")
    net.connect("gpu", "hypervisor")
    for name in ("gpu", "mediator", "hypervisor"):
        net.connect(name, "launcher", control=True)
    for vm in guests:
        add_guest(net, vm, vm_frames[vm], seed, trace_spans=trace_spans)
    return Bench(net, layout, mediator, hv, gpu, [host_mem, *vms.values()])


def run_task(b: Bench, gen: Any, node: str = "mediator") -> Any:
    """Run a task fragment of a core (a generator of actions) on its node to its end."""
    box = b.net.spawn(node, gen)
    b.net.run(until=lambda: bool(box))
    if "error" in box:
        raise box["error"]
    return box.get("value")


def enable_execlists(b: Bench, vgpu: int, engines: Iterable[str] = ("rcs", "bcs", "vcs", "vecs")) -> None:
    """What a GVT-g aware guest does before it submits: read the PV page, enable execlists."""
    b.trap_read(vgpu, pvinfo.BASE + pvinfo.MAGIC_OFF, 8)
    b.trap_writes(vgpu, [(regs.ring(e, regs.RING_MODE), 4,
                          regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE)) for e in engines])


def started_bench(**kw: Any) -> Iterator[Bench]:
    """A bench with vGPUs 1 and 2 (type _8) created and the log of their creation cleared."""
    b = make_bench(**kw)
    try:
        b.setup([(1, "_8"), (2, "_8")])
        b.clear_log()
        yield b
    finally:
        b.close()


def add_peer(net: SimNet, name: str, connect_to: str = "hypervisor") -> Recorder:
    """A recording stand-in for node `name`, connected as that node would be."""
    rec = Recorder()
    net.add(name, rec)
    net.connect(name, connect_to)
    return rec


def add_guest(net: SimNet, vm: int, ram_frames: int, seed: int = SEED, load: LoadSpec | None = None,
              trace_spans: int = 0, **kw: Any) -> GuestCore:
    g = GuestCore(vm, ram_frames, seed, load or LoadSpec(), launcher=None, **kw)
    name = f"guest{vm}"
    net.add(name, g, trace_spans=trace_spans)
    net.connect(name, "hypervisor")
    net.connect(name, "launcher", control=True)
    return g


def wall_ns() -> int:
    """For micro-benchmarks of the harness itself."""
    return time.perf_counter_ns()
