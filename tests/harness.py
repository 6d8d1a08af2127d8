"""A synchronous, in-process driver for the sans-IO cores, and a small mediator test bench.

`drive` runs a task (the generator a core's `handle` returns) to completion: each `Call` is
answered by the peer function registered for its peer name (its reply resumes the task, a
GvtError it raises is thrown into the task as a RemoteError, as the runtime would deliver an
ERROR reply), each `Post` is recorded and then delivered to its peer (if one is registered).

`make_bench` builds REAL cores wired to each other: a MediatorCore, a HypervisorCore and a
GpuSim sharing one memory Layout, with anonymous memory. Nothing under test is mocked.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from types import GeneratorType
from typing import Any, Callable, Iterable

import numpy as np

from nodes import hw
from nodes.errors import GvtError
from nodes.gpu.sim import GpuSim
from nodes.hypervisor.core import HypervisorCore
from nodes.mediator.core import MediatorCore
from nodes.mediator.translate import translate_entries
from nodes.memory import Fabric, Layout, OwnedMemory, RegionMemory
from nodes.runtime import Call, Post, Sleep
from nodes.wire.codec import Envelope, RemoteError

Peer = Callable[[Any], Any]     # Call | Post -> reply value

HOST_POOL_FRAMES = 4096
VM_FRAMES = {1: 16384, 2: 16384}
SEED = 1234


class PostDeliveryError(AssertionError):
    """A peer refused a one-way message: in a real run that would be a silent loss."""


def drive(gen: Any, peers: dict[str, Peer], *, on_call: Callable[[Call], None] | None = None,
          ) -> tuple[Any, list[Post]]:
    """Run `gen` to completion. Returns (its return value, every Post it yielded, in order).

    A value that is not a generator is a handler's immediate reply: returned as is.
    A peer function that itself returns a generator gets that task driven with the same peers.
    """
    posts: list[Post] = []
    if not isinstance(gen, GeneratorType):
        return gen, posts
    value: Any = None
    exc: BaseException | None = None
    while True:
        try:
            action = gen.throw(exc) if exc is not None else gen.send(value)
        except StopIteration as stop:
            return stop.value, posts
        value, exc = None, None
        if type(action) is Call:
            if on_call is not None:
                on_call(action)
            fn = peers.get(action.peer)
            if fn is None:
                raise AssertionError(f"task called unknown peer {action.peer!r} ({action.kind})")
            try:
                reply = fn(action)
                if isinstance(reply, GeneratorType):
                    reply, sub_posts = drive(reply, peers, on_call=on_call)
                    posts.extend(sub_posts)
                value = reply
            except GvtError as err:      # what the runtime turns an ERROR reply into
                exc = RemoteError(err.code, err.text, action.peer, action.kind)
        elif type(action) is Post:
            posts.append(action)
            fn = peers.get(action.peer)
            if fn is not None:
                try:
                    r = fn(action)
                    if isinstance(r, GeneratorType):
                        _, sub_posts = drive(r, peers, on_call=on_call)
                        posts.extend(sub_posts)
                except GvtError as err:
                    raise PostDeliveryError(f"{action.peer} refused posted {action.kind}: {err}") from err
        elif type(action) is Sleep:
            raise AssertionError("a mediator task slept; the synchronous driver does not model time")
        else:
            raise AssertionError(f"task yielded {type(action).__name__}, not Call/Post")


# ---- TRAP payloads -------------------------------------------------------------------------------
def pack_writes(writes: Iterable[tuple[int, int, int]]) -> dict:
    """[(off, size, val), ...] -> a TRAP write-batch payload (op "w", packed fields)."""
    writes = list(writes)
    return {"op": "w",
            "off": b"".join(struct.pack("<I", o) for o, _, _ in writes),
            "size": bytes(s for _, s, _ in writes),
            "val": b"".join(struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF) for _, _, v in writes)}


def gtt_off(index: int) -> int:
    """BAR0 offset of GGTT entry `index`."""
    return hw.GTT_OFFSET + index * hw.GTT_ENTRY_SIZE


# ---- the bench -----------------------------------------------------------------------------------
@dataclass
class Bench:
    layout: Layout
    mediator: MediatorCore
    hv: HypervisorCore
    gpu: GpuSim
    memories: list[RegionMemory]
    calls: list[Call] = field(default_factory=list)      # every Call any driven task made
    posts: list[Post] = field(default_factory=list)      # every Post any driven task made
    seq: int = 0

    # peers as the mediator sees them
    def _env(self, kind: str, vgpu: int, payload: Any, peer: str) -> Envelope:
        self.seq += 1
        return Envelope(kind, self.seq, 0, vgpu, 0, 1, payload, peer=peer)

    def _hypervisor(self, msg: Call | Post) -> Any:
        return self.hv.handle(self._env(msg.kind, msg.vgpu, msg.payload, "mediator"), time.monotonic_ns())

    def _gpu(self, msg: Call | Post) -> Any:
        return self.gpu.handle(self._env(msg.kind, msg.vgpu, msg.payload, "mediator"), time.monotonic_ns())

    @property
    def peers(self) -> dict[str, Peer]:
        return {self.mediator.hypervisor: self._hypervisor, self.mediator.gpu: self._gpu}

    def run(self, task: Any) -> Any:
        """Drive a mediator task (or take an immediate value), logging its Calls and Posts."""
        value, posts = drive(task, self.peers, on_call=self.calls.append)
        self.posts.extend(posts)
        return value

    def send(self, kind: str, payload: Any, vgpu: int = 0) -> Any:
        """A message from the hypervisor to the mediator, handled and driven to its reply."""
        env = self._env(kind, vgpu, payload, "hypervisor")
        return self.run(self.mediator.handle(env, time.monotonic_ns()))

    def setup(self, specs: list[tuple[int, str]]) -> Any:
        return self.run(self.mediator.setup(specs))

    # guest traps
    def trap_read(self, vgpu: int, off: int, size: int) -> int:
        return self.send("TRAP", {"op": "r", "off": off, "size": size}, vgpu)

    def trap_writes(self, vgpu: int, writes: Iterable[tuple[int, int, int]]) -> dict:
        return self.send("TRAP", pack_writes(writes), vgpu)

    def trap_write(self, vgpu: int, off: int, size: int, val: int) -> dict:
        return self.trap_writes(vgpu, [(off, size, val)])

    def ggtt_write(self, vgpu: int, index: int, entry: int) -> dict:
        return self.trap_write(vgpu, gtt_off(index), 8, entry)

    def ggtt_write_half(self, vgpu: int, index: int, high: bool, dword: int) -> dict:
        return self.trap_write(vgpu, gtt_off(index) + (4 if high else 0), 4, dword)

    def ggtt_read(self, vgpu: int, index: int) -> int:
        return self.trap_read(vgpu, gtt_off(index), 8)

    # observations
    def phys(self, index: int) -> int:
        return int(self.gpu.ggtt[index])

    def calls_of(self, kind: str) -> list[Call]:
        return [c for c in self.calls if c.kind == kind]

    def posts_of(self, kind: str) -> list[Post]:
        return [p for p in self.posts if p.kind == kind]

    def pinned_gfns_in_calls(self) -> list[int]:
        """Every gfn the mediator asked to pin, across all GFN_PIN calls (with repeats)."""
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

    def close(self) -> None:
        for rm in self.memories:
            rm.close(unlink=False)


def make_bench(*, translate: Callable[..., Any] = translate_entries,
               vm_frames: dict[int, int] | None = None, host_frames: int = HOST_POOL_FRAMES,
               aperture_size: int = 1024 * hw.MiB, max_vgpus: int = hw.GVT_MAX_VGPU - 1,
               seed: int = SEED) -> Bench:
    """A real mediator, hypervisor and gpu on one Layout, with anonymous ("msg") memory."""
    vm_frames = dict(VM_FRAMES if vm_frames is None else vm_frames)
    layout = Layout.build(host_frames, vm_frames)
    m_owned = OwnedMemory(layout)
    host_mem = RegionMemory.create(layout.host, "msg", "test")
    m_owned.add(host_mem)
    vms = {vm: RegionMemory.create(layout.vm_region(vm), "msg", "test") for vm in vm_frames}
    h_owned = OwnedMemory(layout)
    for rm in vms.values():
        h_owned.add(rm)
    clock = time.monotonic_ns
    mediator = MediatorCore(layout, m_owned, aperture_size=aperture_size, max_vgpus=max_vgpus,
                            clock=clock, translate=translate)
    hv = HypervisorCore(layout, h_owned, vms, seed, clock=clock)
    gpu = GpuSim(Fabric(layout, "msg", "test"), clock)
    return Bench(layout, mediator, hv, gpu, [host_mem, *vms.values()])
