"""The GVT-g mediator core: creates vGPUs and routes their trapped accesses to the rooms that
emulate them (mmio -> handlers, gtt; vgpu for resets). Sans-IO: messages and the time in,
replies and tasks out."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from nodes.actions import Call
from nodes.errors import GvtError
from nodes.hw import bar0, partition
from nodes.mediator import mmio
from nodes.mediator.aperture import GmAllocator
from nodes.mediator.translate import translate_entries
from nodes.mediator.vgpu import VGpu, declare_vgpu_metrics
from nodes.memory import Layout
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.stats import Stats
from nodes.wire.codec import Envelope
from nodes.wire.schema import unpack_write_batch

# Guest-physical space above RAM that the hypervisor refuses to pin (an MMIO hole): gfns in it
# take the "pin failed" path, gfns past it the "not guest RAM" path without a call.
GFN_HOLE_FRAMES = 4096


class MediatorCore:
    role = "mediator"

    def __init__(self, layout: Layout, *, aperture_size: int = 1024 << 20,
                 max_vgpus: int = partition.GVT_MAX_VGPU - 1,
                 translate: Callable[..., Any] = translate_entries,
                 hypervisor: str = "hypervisor", gpu: str = "gpu"):
        self.layout = layout
        self.alloc = GmAllocator(aperture_size)
        self.max_vgpus = max_vgpus
        self.translate = translate
        self.hypervisor, self.gpu = hypervisor, gpu
        self.scratch_mfn = layout.host.base_mfn       # the first page of the host pool
        self.vgpus: dict[int, VGpu] = {}
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        declare_vgpu_metrics(self.stats)
        self.stats.counter("gvtbench_ggtt_entries_translated",
                           "Guest GGTT entries emulated, by result", ["vgpu", "result"])
        self.stats.gauge("gvtbench_pinned_pages", "Guest pages pinned for GGTT mappings", ["vgpu"])

    # ---- device model ------------------------------------------------------------------------
    def create_vgpu(self, vgpu_id: int, vgpu_type: str) -> VGpu:
        if vgpu_id in self.vgpus:
            raise GvtError("EEXIST", f"vGPU {vgpu_id} exists already")
        if vgpu_id < 1:
            raise GvtError("EINVAL", "vGPU id 0 is the idle vGPU; ids start at 1")
        if len(self.vgpus) >= self.max_vgpus:
            raise GvtError("ENOSPC", f"the mediator is set to at most {self.max_vgpus} vGPUs "
                           f"(upstream GVT-g: {partition.GVT_MAX_VGPU - 1})")
        region = self.layout.by_name.get(f"vm{vgpu_id}")
        if region is None:
            raise GvtError("ENOENT", f"no guest RAM region for VM {vgpu_id} in the memory layout")
        part = self.alloc.allocate(vgpu_type)
        vgpu = VGpu(vgpu_id, vgpu_type, part, stats=self.stats, scratch_mfn=self.scratch_mfn,
                    gfns=region.frames + GFN_HOLE_FRAMES, hypervisor=self.hypervisor, gpu=self.gpu,
                    translate=self.translate)
        self.vgpus[vgpu_id] = vgpu
        return vgpu

    def setup(self, specs: list[tuple[int, str]]) -> Iterator[Any]:
        """Create the configured vGPUs; every GGTT entry of each starts at the scratch page."""
        for vgpu_id, vgpu_type in specs:
            vgpu = self.create_vgpu(vgpu_id, vgpu_type)
            yield from vgpu.ggtt.reset()
        yield Call(self.gpu, "SYNC")
        return [v.info() for v in self.vgpus.values()]

    def _vgpu(self, vgpu_id: int) -> VGpu:
        vgpu = self.vgpus.get(vgpu_id)
        if vgpu is None:
            raise GvtError("ENODEV", f"no vGPU {vgpu_id}")
        return vgpu

    # ---- messages ------------------------------------------------------------------------------
    def lane(self, msg: Envelope) -> Any:
        # a vGPU's accesses are emulated one at a time, in the order the guest made them
        return msg.vgpu if msg.kind in ("TRAP_READ", "TRAP_WRITE", "VGPU_RESET") else None

    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        if kind == "TRAP_READ":
            return mmio.emulate_read(self._vgpu(msg.vgpu), p["off"], p["size"])
        if kind == "TRAP_WRITE":
            vgpu = self._vgpu(msg.vgpu)
            return self._trap_write(vgpu, *unpack_write_batch(p))
        if kind == "SYNC":
            return self._sync()
        if kind == "PARTITIONS":
            return [v.info() for v in self.vgpus.values()]
        if kind == "VGPU_RESET":
            return self._reset(self._vgpu(msg.vgpu))
        raise GvtError("ENOTSUP", f"the mediator does not handle {kind}")

    def _trap_write(self, vgpu: VGpu, offs: Any, sizes: Any, vals: Any) -> Iterator[Any]:
        res = yield from mmio.emulate_writes(vgpu, offs, sizes, vals)
        if res["gtt"]:
            self._export_ggtt(vgpu)
        return res

    def _sync(self) -> Iterator[Any]:
        # a request on the gpu link is answered after every posted write before it
        return (yield Call(self.gpu, "SYNC"))

    def _reset(self, vgpu: VGpu) -> Iterator[Any]:
        yield from vgpu.reset_device()
        yield Call(self.gpu, "SYNC")
        self._export_ggtt(vgpu)
        return vgpu.info()

    OBSERVED = frozenset({"TRAP_READ", "TRAP_WRITE"})

    def observe(self, msg: Envelope, result: Any, elapsed_ns: int) -> None:
        """The shell measured how long a request took to emulate: the mediator stage."""
        if msg.kind == "TRAP_READ":
            kind = bar0.trap_kind(bar0.decode(msg.payload["off"], msg.payload["size"]), False)
            self._record(msg.vgpu, kind, elapsed_ns, 1)
        elif msg.kind == "TRAP_WRITE":
            for kind, n in (("mmio_write", result["mmio"]), ("gtt_write", result["gtt"])):
                if n:
                    self._record(msg.vgpu, kind, elapsed_ns, n)

    def _record(self, vgpu: int, kind: str, elapsed_ns: int, n: int) -> None:
        lab = (vgpu, kind, "mediator")
        self.stats.hist(TRAP_LATENCY, lab).record(elapsed_ns, n)
        self.stats.inc(TRAPS, lab, n)

    def _export_ggtt(self, vgpu: VGpu) -> None:
        for result, count in vgpu.ggtt.counts.items():
            self.stats.set("gvtbench_ggtt_entries_translated", (vgpu.id, result), count)
        self.stats.set("gvtbench_pinned_pages", (vgpu.id,), vgpu.pins.count())

    def snapshot(self) -> dict:
        return {"vgpus": {v.id: {**v.info(), "ggtt": dict(v.ggtt.counts), "pinned": v.pins.count(),
                                 "pin_calls": v.pins.pin_calls}
                          for v in self.vgpus.values()}}
