"""A guest's GPU objects made by hand, for tests that submit exactly the commands they are about.

`HandGuest(bench, vm)` does in the VM what the guest i915 does at boot (nodes/guest/i915.py
lays the objects out): a context per engine (logical ring context, 16 KiB ring, status page)
mapped in the first pages of the aperture, one 4-level PPGTT (batch pages in PT 0, data pages
in PT 1), PV page read and execlists enabled. Then `submit(engine, ring)` writes a ring segment
and the four ELSP dwords, through the same traps a guest uses; `bench.net.run()` lets the gpu run
it. Nothing here is mocked: the real mediator, hypervisor and gpu cores do the work.
"""
from __future__ import annotations

import struct
from typing import Any

import numpy as np

from harness import Bench, enable_execlists
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, cmd, gtt, lrc, pvinfo, regs
from nodes.guest import i915

F = lrc.PTE_PRESENT | lrc.PTE_RW
ENGINES = ("rcs", "bcs")
VA_BATCH = 0x000000             # PT 0: batch pages
VA_DATA = 0x200000              # PT 1: data pages
DATA_PAGES = 16


class HandGuest:
    def __init__(self, b: Bench, vm: int, engines: tuple[str, ...] = ENGINES):
        self.b, self.vm = b, vm
        v = self.vgpu = b.mediator.vgpus[vm]
        lay = self.lay = i915.Layout(vm, b.hv.vms[vm].frames, b.ap_index(vm), engines)
        self.ram: dict[int, bytes] = {}
        # a PPGTT of its own: PML4 -> PDP -> PD -> PT 0 (batches), PT 1 (data)
        self.pml4, self.pdp, self.pd, self.pt0, self.pt1 = lay.pml4, lay.pdp, lay.pd, lay.pts[0], lay.pts[1]
        self.data_gfns = lay.churn_pool[:DATA_PAGES]
        self.put(self.pml4, {0: lrc.entry(self.pdp, F)})
        self.put(self.pdp, {0: lrc.entry(self.pd, F)})
        self.put(self.pd, {0: lrc.entry(self.pt0, F), 1: lrc.entry(self.pt1, F)})
        self.put(self.pt0, {k: lrc.entry(g, F) for k, g in enumerate(lay.batch_gfns)})
        self.put(self.pt1, {k: lrc.entry(g, F) for k, g in enumerate(self.data_gfns)})
        pml4_gpa = self.pml4 << PAGE_SHIFT
        for e in lay.engines.values():
            for c in e.contexts:
                self.write(c.lrc_gfns[0] << PAGE_SHIFT, i915.context_image(c, pml4_gpa))
        enable_execlists(b, vm, engines)
        b.trap_writes(vm, [(gtt.offset_of(i), 8, gtt.encode(g, gtt.PTE_PRESENT | gtt.PTE_RW))
                           for i, g in lay.ggtt])
        b.trap_writes(vm, [(regs.ring(n, regs.RING_HWS_PGA), 4, e.hwsp_gm) for n, e in lay.engines.items()])
        b.trap_writes(vm, [(regs.gt_ier(0), 4, 0xFFFFFFFF), (regs.gt_imr(0), 4, 0),
                           (regs.MASTER_IRQ, 4, regs.MASTER_IRQ_CONTROL)])
        # announce the PPGTT (G2V create), which holds its shadow between workloads
        b.trap_writes(vm, [(pvinfo.BASE + pvinfo.PDP0_LO, 4, pml4_gpa & 0xFFFFFFFF),
                           (pvinfo.BASE + pvinfo.PDP0_LO + 4, 4, pml4_gpa >> 32),
                           (pvinfo.BASE + pvinfo.G2V_NOTIFY, 4, pvinfo.G2V_PPGTT_L4_CREATE)])
        self.mm = v.ppgtt.find_mm(lrc.ADDRESSING_LEGACY_64B, [pml4_gpa, 0, 0, 0])
        assert v.failsafe is None

    # ---- guest RAM ----------------------------------------------------------------------------
    def write(self, gpa: int, data: bytes) -> None:
        self.b.hv.gpa_write(self.b.hv.vms[self.vm], [[gpa + k, data[k:k + PAGE_SIZE]]
                                                      for k in range(0, len(data), PAGE_SIZE)])

    def read(self, gpa: int, n: int) -> bytes:
        return b"".join(self.b.hv.gpa_read(self.b.hv.vms[self.vm], [[gpa, n]]))

    def put(self, gfn: int, entries: dict[int, int]) -> None:
        page = np.zeros(512, dtype="<u8")
        for i, e in entries.items():
            page[i] = e
        self.write(gfn << PAGE_SHIFT, page.tobytes())

    # ---- where things are ---------------------------------------------------------------------
    def ctx(self, engine: str = "rcs", k: int = 0) -> i915.Context:
        return self.lay.engines[engine].contexts[k]

    def batch_gpa(self, page: int) -> int:
        return self.lay.batch_gfns[page] << PAGE_SHIFT

    def batch_ggtt(self, page: int) -> int:
        """A GGTT address of batch page `page`: mapped just after the driver's objects."""
        idx = self.b.ap_index(self.vm) + i915.DRIVER_GGTT_PAGES + page
        self.b.ggtt_write(self.vm, idx, gtt.encode(self.lay.batch_gfns[page], gtt.PTE_PRESENT | gtt.PTE_RW))
        return gtt.gm_of(idx)

    def data_gpa(self, page: int, off: int = 0) -> int:
        return (self.data_gfns[page] << PAGE_SHIFT) + off

    def data_va(self, page: int, off: int = 0) -> int:
        return VA_DATA + page * PAGE_SIZE + off

    def hwsp_gm(self, engine: str = "rcs") -> int:
        return self.lay.engines[engine].hwsp_gm

    def hwsp_gpa(self, engine: str = "rcs") -> int:
        return self.lay.engines[engine].hwsp_gfn << PAGE_SHIFT

    # ---- work ---------------------------------------------------------------------------------
    def put_batch(self, page: int, words: list[int]) -> int:
        """Batch page `page` holds these commands; returns its PPGTT address."""
        self.write(self.batch_gpa(page), cmd.encode(*words))
        return VA_BATCH + page * PAGE_SIZE

    def submit(self, ring: list[int], engine: str = "rcs", k: int = 0, run: bool = True,
               qword_last: bool = False) -> dict:
        """Append commands to a context's ring, set its tail, write the ELSP; returns the
        TRAP_WRITE answer of the ELSP writes (n_errors, errors). qword_last: the fourth ELSP
        dword comes as the low half of an 8-byte write (the high half lands in the register
        after the port)."""
        c = self.ctx(engine, k)
        if len(ring) % 2:
            ring = ring + [cmd.MI_NOOP.header()]
        data = cmd.encode(*ring)
        at = c.tail
        for j in range(0, len(data), 4):
            pos = (at + j) % i915.RING_SIZE
            self.write((c.ring_gfns[pos // PAGE_SIZE] << PAGE_SHIFT) + pos % PAGE_SIZE, data[j:j + 4])
        c.tail = (at + len(data)) % i915.RING_SIZE
        self.write((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_TAIL, struct.pack("<I", c.tail))
        elsp = regs.ring(engine, regs.RING_ELSP)
        writes = [(elsp, 4, d) for d in lrc.elsp_dwords(c.desc)]
        if qword_last:
            writes[3] = (elsp, 8, writes[3][2])
        res = self.b.trap_writes(self.vm, writes)
        if run:
            self.b.net.run()
        return res

    def skip(self, engine: str = "rcs", k: int = 0) -> None:
        """Move the context's ring head to its tail, as i915 does for work the GPU will never run
        (a refused or hung submission), so the next submission starts after it."""
        c = self.ctx(engine, k)
        self.write((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_HEAD, struct.pack("<I", c.tail))

    def u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def ring_head(self, engine: str = "rcs", k: int = 0) -> int:
        return self.u32((self.ctx(engine, k).lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_HEAD)


def seqno_store(hg: HandGuest, value: int, engine: str = "rcs") -> list[int]:
    """A store of `value` to the engine's status page (dword 0x30), as i915's rings end."""
    return cmd.store_dword(hg.hwsp_gm(engine) + 4 * lrc.HWS_SEQNO_INDEX, value, ggtt=True)


def csb_entries(v: Any, engine: str = "rcs") -> list[tuple[int, int]]:
    base = regs.ring(engine, regs.RING_CSB)
    return [(v.vregs.get(base + 8 * i, 0), v.vregs.get(base + 8 * i + 4, 0)) for i in range(6)]
