"""The GVT-g mediator core: vGPUs, trap emulation, GGTT shadowing. Sans-IO: messages in, tasks out."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nodes import hw
from nodes.errors import GvtError, need
from nodes.mediator.gtt import GgttShadow
from nodes.mediator.handlers import VRegs
from nodes.mediator.translate import translate_entries
from nodes.mediator.vgpu import GmAllocator, Partition, type_info
from nodes.memory import Layout, OwnedMemory
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.runtime import Call
from nodes.stats import Stats
from nodes.wire.codec import Envelope

# Guest-physical space above RAM that the hypervisor refuses to pin (an MMIO hole): gfns in it
# take the "pin failed" path, gfns past it the "invalid gfn" path.
GFN_HOLE_FRAMES = 4096


class VGpu:
    def __init__(self, vgpu_id: int, vgpu_type: str, part: Partition, ggtt: GgttShadow):
        self.id, self.type, self.part, self.ggtt = vgpu_id, vgpu_type, part, ggtt
        self.weight = type_info(vgpu_type)[3]
        self.vregs = VRegs(vgpu_id, part)

    @property
    def failsafe(self) -> str | None:
        return self.vregs.failsafe

    def info(self) -> dict:
        return {"id": self.id, "type": self.type, "weight": self.weight, "failsafe": self.failsafe,
                "partition": self.part.to_wire(), "pv_notified": self.vregs.pv_notified}


class MediatorCore:
    role = "mediator"

    def __init__(self, layout: Layout, owned: OwnedMemory, *, aperture_size: int = 1024 * hw.MiB,
                 max_vgpus: int = hw.GVT_MAX_VGPU - 1, clock: Callable[[], int],
                 translate: Callable[..., Any] = translate_entries,
                 hypervisor: str = "hypervisor", gpu: str = "gpu"):
        self.layout, self.owned, self.clock = layout, owned, clock
        self.alloc = GmAllocator(aperture_size)
        self.max_vgpus = max_vgpus
        self.translate = translate
        self.hypervisor, self.gpu = hypervisor, gpu
        self.scratch_mfn = layout.host.base_mfn       # the first page of the host pool
        self.vgpus: dict[int, VGpu] = {}
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        self.stats.counter("gvtbench_ggtt_entries_translated",
                           "Guest GGTT entries emulated, by result", ["vgpu", "result"])
        self.stats.gauge("gvtbench_vgpu_failsafe", "1 while a vGPU is in failsafe mode", ["vgpu"])
        self.stats.gauge("gvtbench_pinned_pages", "Guest pages pinned for GGTT mappings", ["vgpu"])

    # ---- device model ------------------------------------------------------------------------
    def create_vgpu(self, vgpu_id: int, vgpu_type: str) -> VGpu:
        if vgpu_id in self.vgpus:
            raise GvtError("EEXIST", f"vGPU {vgpu_id} exists already")
        if not 1 <= vgpu_id:
            raise GvtError("EINVAL", "vGPU id 0 is the idle vGPU; ids start at 1")
        if len(self.vgpus) >= self.max_vgpus:
            raise GvtError("ENOSPC", f"the mediator is set to at most {self.max_vgpus} vGPUs "
                           f"(upstream GVT-g: {hw.GVT_MAX_VGPU - 1})")
        region = self.layout.by_name.get(f"vm{vgpu_id}")
        if region is None:
            raise GvtError("ENOENT", f"no guest RAM region for VM {vgpu_id} in the memory layout")
        part = self.alloc.allocate(vgpu_type)
        ggtt = GgttShadow(vgpu_id, part, region.frames + GFN_HOLE_FRAMES, self.scratch_mfn,
                          self.hypervisor, self.gpu, self.translate)
        vgpu = self.vgpus[vgpu_id] = VGpu(vgpu_id, vgpu_type, part, ggtt)
        self.stats.set("gvtbench_vgpu_failsafe", (vgpu_id,), 0)
        return vgpu

    def setup(self, specs: list[tuple[int, str]]) -> Iterator[Any]:
        """Create the configured vGPUs; every GGTT entry of each starts at the scratch page."""
        for vgpu_id, vgpu_type in specs:
            vgpu = self.create_vgpu(vgpu_id, vgpu_type)
            yield from vgpu.ggtt.scratch_all()
        yield Call(self.gpu, "SYNC")
        return [v.info() for v in self.vgpus.values()]

    def _vgpu(self, vgpu_id: int) -> VGpu:
        vgpu = self.vgpus.get(vgpu_id)
        if vgpu is None:
            raise GvtError("ENODEV", f"no vGPU {vgpu_id}")
        return vgpu

    # ---- messages ------------------------------------------------------------------------------
    def lane(self, msg: Envelope) -> Any:
        # accesses of one vGPU are emulated one at a time, in the order the guest made them
        return msg.vgpu if msg.kind == "TRAP" else None

    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        if kind == "TRAP":
            vgpu = self._vgpu(msg.vgpu)
            op = need(p, "op", str, "TRAP")
            if op == "r":
                return self._trap_read(vgpu, need(p, "off", int), need(p, "size", int), now)
            if op == "w":
                off_b, size_b, val_b = need(p, "off", bytes), need(p, "size", bytes), need(p, "val", bytes)
                if len(off_b) % 4 or len(val_b) % 8:
                    raise GvtError("EINVAL", "TRAP write batch needs packed u32 offsets and u64 values")
                offs = np.frombuffer(off_b, dtype="<u4")
                sizes = np.frombuffer(size_b, dtype=np.uint8)
                vals = np.frombuffer(val_b, dtype="<u8")
                if not len(offs) == len(sizes) == len(vals):
                    raise GvtError("EINVAL", "TRAP write batch has fields of different lengths")
                return self._trap_writes(vgpu, offs, sizes, vals, now)
            raise GvtError("EINVAL", f"TRAP op must be 'r' or 'w', not {op[:16]!r}")
        if kind == "DMA_READ":
            return self.owned.dma_read(p)
        if kind == "DMA_WRITE":
            return self.owned.dma_write(p)
        if kind == "SYNC":
            return self._sync()
        if kind == "PARTITIONS":
            return [v.info() for v in self.vgpus.values()]
        raise GvtError("ENOTSUP", f"the mediator does not handle {kind}")

    def _sync(self) -> Iterator[Any]:
        # a read on the gpu link lands after every posted GGTT write before it
        return (yield Call(self.gpu, "SYNC"))

    def _trap_read(self, vgpu: VGpu, off: int, size: int, now: int) -> int:
        if off >= hw.GTT_OFFSET:
            val = vgpu.ggtt.read(off, size)
        elif off < hw.MMIO_SIZE:
            val = vgpu.vregs.read(off, size)
        else:
            raise GvtError("EFAULT", f"BAR0 offset {off:#x} is in the hole between MMIO and GTT")
        self._observe(vgpu.id, hw.trap_kind(off, False), now, 1)
        return val

    def _trap_writes(self, vgpu: VGpu, offs: np.ndarray, sizes: np.ndarray, vals: np.ndarray,
                     now: int) -> Iterator[Any]:
        """A batch of posted writes, in guest order. Runs of 8-byte GGTT writes go as one batch."""
        # only aligned 8-byte GGTT writes take the batch path; a misaligned one is refused below
        gtt8 = (offs >= hw.GTT_OFFSET) & (sizes == 8) & ((offs & 7) == 0)
        n = len(offs)
        bounds = [0, *(np.flatnonzero(np.diff(gtt8.astype(np.int8))) + 1).tolist(), n]
        n_mmio = n_gtt = 0
        errors = []
        for a, b in zip(bounds, bounds[1:]):
            if a == b:
                continue
            if gtt8[a]:
                idx = (offs[a:b].astype(np.int64) - hw.GTT_OFFSET) >> 3
                yield from vgpu.ggtt.write_entries(idx, vals[a:b], shadow=vgpu.failsafe is None)
                n_gtt += b - a
                continue
            for i in range(a, b):
                off, size, val = int(offs[i]), int(sizes[i]), int(vals[i])
                try:
                    if off >= hw.GTT_OFFSET:
                        if size != 4:
                            raise GvtError("EINVAL", f"GTT write of {size} bytes at {off:#x}")
                        yield from vgpu.ggtt.write_half(off, val, shadow=vgpu.failsafe is None)
                        n_gtt += 1
                    elif off < hw.MMIO_SIZE:
                        was = vgpu.failsafe
                        vgpu.vregs.write(off, size, val)
                        if vgpu.failsafe and not was:
                            self.stats.set("gvtbench_vgpu_failsafe", (vgpu.id,), 1)
                        n_mmio += 1
                    else:
                        raise GvtError("EFAULT", f"write to BAR0 hole at {off:#x}")
                except GvtError as err:     # one bad access must not lose the rest of the batch
                    errors.append(err.text)
        if n_mmio:
            self._observe(vgpu.id, "mmio_write", now, n_mmio)
        if n_gtt:
            self._observe(vgpu.id, "gtt_write", now, n_gtt)
            self._export_ggtt(vgpu)
        return {"n": n, "errors": errors[:8], "n_errors": len(errors)}

    def _observe(self, vgpu_id: int, kind: str, start: int, n: int) -> None:
        lab = (vgpu_id, kind, "mediator")
        self.stats.hist(TRAP_LATENCY, lab).record(self.clock() - start, n)
        self.stats.inc(TRAPS, lab, n)

    def _export_ggtt(self, vgpu: VGpu) -> None:
        for result, count in vgpu.ggtt.counts.items():
            self.stats.set("gvtbench_ggtt_entries_translated", (vgpu.id, result), count)
        self.stats.set("gvtbench_pinned_pages", (vgpu.id,), vgpu.ggtt.pinned_gfns())

    def snapshot(self) -> dict:
        return {"vgpus": {v.id: {**v.info(), "ggtt": dict(v.ggtt.counts),
                                 "pinned": v.ggtt.pinned_gfns(), "pin_calls": v.ggtt.pin_calls}
                          for v in self.vgpus.values()}}
