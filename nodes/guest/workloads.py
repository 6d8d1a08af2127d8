"""The guest's GPU work: the driver objects of nodes.guest.i915 set up at boot, the `submit` and
`ppgtt-churn` load mixes, interrupt handling and retirement, the hang check, and the end-of-run
checks of its own RAM (the isolation sweep) that the ledger's workload verdict rests on.

The guest keeps a model of every page it wrote and of what its completed workloads must have
stored (tokens, counters, seqnos); RAM_VERIFY compares all of its RAM with that model. Only the
bytes the mediator or the GPU write at times the guest cannot know are left out: the status
page's CSB copy, each context image's RING_HEAD, and the stores of workloads that failed (they
may or may not have happened before the hang).
"""
from __future__ import annotations

import hashlib
import statistics
import struct
from collections import deque
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from nodes.actions import Post
from nodes.errors import GvtError
from nodes.guest import i915
from nodes.guest.i915 import Context, EngineState, Workload
from nodes.guest.mmu import GuestRam
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, gtt, lrc, pvinfo, regs
from nodes.metrics import WORKLOAD_LATENCY, WORKLOADS

if TYPE_CHECKING:
    from nodes.guest.core import GuestCore

_I = struct.Struct("<I")
_Q = struct.Struct("<Q")
SWEEP_PAGES = 128                   # pages per load of the sweep (512 KiB: inside a frame)
CHECK_REGISTERS_EVERY = 16          # interrupts between cross-checks of the CSB registers
RECENT = 32                         # workloads whose service time says how loaded the system is


CSB_INVALID = b"\xff" * 8       # a CSB entry of the status page no event has written since reset


class WorkloadDriver:
    def __init__(self, core: GuestCore, ram: GuestRam, engines: tuple[str, ...], attack: bool = False):
        self.core, self.ram, self.engines_used = core, ram, engines
        self.attack = attack                        # lay out the hostile mix's objects too
        self.lay: i915.Layout | None = None
        self.model: dict[int, bytearray] = {}       # gfn -> what the page must hold
        self.loose: dict[int, set[int]] = {}        # gfn -> dword offsets anything may hold
        self.token_next = 0
        self.batch_next = 0
        self.batch_busy: set[int] = set()
        self.churn_map: dict[int, int] = {}         # churn slot -> gfn it maps
        self.churn_busy: dict[int, int] = {}        # churn slot -> in-flight workloads using it
        self.churn_off: dict[int, int] = {}         # gfn -> next token offset in it
        self.pde3_present = True
        self.inflight = 0
        self.recent_ns: deque[int] = deque(maxlen=RECENT)   # ELSP to retirement, last workloads
        self.counts = {"submitted": 0, "completed": 0, "failed": 0, "failed_expected": 0,
                       "misplaced": 0, "churn_ops": 0, "resets": 0, "csb_mismatches": 0,
                       "empty_irqs": 0}
        self.fail_reasons: dict[str, int] = {}
        self.per_ctx: dict[int, list[int]] = {}     # ctx_id -> [completed, failed]
        self.irqs = 0
        self.reboots = 0            # VM resets: a check whose reads span one is void
        self.irq_running = self.irq_again = False
        self.irq_now = 0

    # ---- guest RAM with its model --------------------------------------------------------------
    def store(self, gpa: int, data: bytes) -> list[Post]:
        self.expect(gpa, data)
        return self.ram.store(gpa, data, self.core.next_fault_w)

    def expect(self, gpa: int, data: bytes) -> None:
        """What the GPU or the mediator will have stored (the model only)."""
        at = 0
        while at < len(data):
            a = gpa + at
            o = a & (PAGE_SIZE - 1)
            k = min(len(data) - at, PAGE_SIZE - o)
            self.model.setdefault(a >> PAGE_SHIFT, bytearray(PAGE_SIZE))[o:o + k] = data[at:at + k]
            at += k

    def loosen(self, gpa: int, n: int = 4) -> None:
        s = self.loose.setdefault(gpa >> PAGE_SHIFT, set())
        for o in range(gpa & (PAGE_SIZE - 1), (gpa & (PAGE_SIZE - 1)) + n, 4):
            s.add(o)

    # ---- boot ------------------------------------------------------------------------------------
    def setup(self, ap_first: int) -> Iterator[Any]:
        """Build the driver's objects, map them, point the engines at their status pages, unmask
        the engines' interrupts, enable execlists on each engine, announce the PPGTT."""
        core = self.core
        if self.lay is None:                        # a reboot keeps the layout and the seqnos
            self.lay = i915.Layout(core.vm, core.ram_frames, ap_first, self.engines_used, self.attack)
        lay = self.lay
        out: list[Any] = []
        for g, entries in lay.ppgtt_pages().items():
            out += self.store(g << PAGE_SHIFT, entries.astype("<u8").tobytes())
        pml4 = lay.pml4 << PAGE_SHIFT
        for e in lay.engines.values():
            for c in e.contexts + ([e.attack] if e.attack else []):
                c.tail = c.submitted_tail = 0
                out += self.store(c.lrc_gfns[0] << PAGE_SHIFT, i915.context_image(c, pml4))
                self.loosen((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_HEAD)
            out += self._reset_csb_page(e)
            self.loosen((e.hwsp_gfn << PAGE_SHIFT) + 4 * lrc.HWS_CSB_BUF0_INDEX,
                        4 * (lrc.HWS_CSB_WRITE_INDEX - lrc.HWS_CSB_BUF0_INDEX + 1))
        for c in range(len(lay.engines) * i915.CONTEXTS_PER_ENGINE):
            self.loosen((lay.counter_gfn << PAGE_SHIFT) + 4 * c)
        for g in lay.churn_pool:
            self.model.setdefault(g, bytearray(PAGE_SIZE))
        for p in out:
            yield p
        idx = np.array([i for i, _ in lay.ggtt], dtype=np.int64)
        vals = gtt.encode(np.array([g for _, g in lay.ggtt], dtype=np.int64), gtt.PTE_PRESENT | gtt.PTE_RW)
        core.note_ggtt(idx, vals)
        yield core.post_batch(gtt.offset_of(idx), [8] * len(idx), vals)
        writes: list[tuple[int, int]] = []
        imr0 = 0xFFFFFFFF
        for name, e in lay.engines.items():
            writes.append((regs.ring(name, regs.RING_HWS_PGA), e.hwsp_gm))
            if name != "rcs":
                writes.append((regs.ring(name, regs.RING_MODE),
                               regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE)))
                writes.append((regs.ring(name, regs.RING_CSB_PTR), regs.csb_ptr_guest_reset()))
            bank, bits = regs.engine_event(name, regs.GT_USER_INTERRUPT | regs.GT_CONTEXT_SWITCH)
            if bank == 0:
                imr0 &= ~bits
        writes += [(regs.gt_ier(0), ~imr0 & 0xFFFFFFFF), (regs.gt_imr(0), imr0),
                   (regs.MASTER_IRQ, regs.MASTER_IRQ_CONTROL),
                   (pvinfo.BASE + pvinfo.PDP0_LO, pml4 & 0xFFFFFFFF),
                   (pvinfo.BASE + pvinfo.PDP0_LO + 4, pml4 >> 32),
                   (pvinfo.BASE + pvinfo.G2V_NOTIFY, pvinfo.G2V_PPGTT_L4_CREATE)]
        yield self._post(writes)
        # the HWS_PGA writes must have landed before a completion can be mirrored: read one back
        got = yield from core.read_reg(regs.ring(self.engines_used[0], regs.RING_HWS_PGA))
        if got != lay.engines[self.engines_used[0]].hwsp_gm:
            raise GvtError("EIO", f"RING_HWS_PGA reads {got:#x} after writing "
                           f"{lay.engines[self.engines_used[0]].hwsp_gm:#x}")
        if self.attack:
            self.core.hostile.loosen_setup()

    # ---- submit ----------------------------------------------------------------------------------
    def room(self) -> bool:
        return self.lay is not None and len(self.batch_busy) + self.core.load.batches_per_workload <= i915.BATCH_PAGES

    def submit(self, intended: int, trace: int = 0) -> list[Any]:
        ld, lay, rng = self.core.load, self.lay, self.core.rng
        e = lay.engines[self.engines_used[self.counts["submitted"] % len(self.engines_used)]]
        ctx = min(e.contexts, key=lambda c: len(c.inflight))
        if ctx.ring_free() < 8 * (3 + 2 * ld.batches_per_workload):
            ctx = max(e.contexts, key=lambda c: c.ring_free())
        bad = ld.bad_ratio > 0 and rng.random() < ld.bad_ratio
        spin = ld.spin_ratio > 0 and rng.random() < ld.spin_ratio
        ctx.seq += 1
        # a spinning workload is meant to fail too: the host's hang detection resets its engine
        w = Workload(ctx.seq, ctx, intended, 0, [], bad or spin, trace=trace)
        out: list[Any] = []
        batch_vas = []
        k = 0
        for b in range(ld.batches_per_workload):
            page = self._batch_page()
            w.batches.append(page)
            stores = []
            for s in range(ld.stores_per_batch):
                tok = i915.token(self.core.vm, ctx.ctx_id, w.seq, k)
                k += 1
                va, gpa = self._target(w, b == 0 and s == 0)
                if bad and b == 0 and s == 0:
                    va, gpa = i915.VA_UNMAPPED, -1
                stores.append((va, tok))
                if gpa >= 0:
                    w.tokens.append((gpa, tok))
            ctr_va = i915.VA_COUNTERS + (ctx.counter_gpa & (PAGE_SIZE - 1))
            va_here = i915.VA_BATCH + page * PAGE_SIZE
            if spin and b == 0:
                # a batch that chains to itself: it never ends, and stores nothing
                cmds, w.tokens = i915.spin_batch(va_here), []
            else:
                cmds = i915.batch_commands(stores, ctr_va,
                                           ld.vertices if ctx.engine == "rcs" else 0)
            out += self.store((lay.batch_gfns[page] << PAGE_SHIFT), cmds)
            batch_vas.append(i915.VA_BATCH + page * PAGE_SIZE)
        seq_gm = e.hwsp_gm + 4 * (lrc.HWS_SEQNO_INDEX + _slot(lay, ctx))
        ring = i915.ring_commands(batch_vas, seq_gm, w.seq)
        out += self._ring_write(ctx, ring)
        w.tail = ctx.tail
        if not any(c.inflight for c in e.contexts):
            # the hang check counts from when work came to the engine: an op issued late (the
            # load fell behind its schedule, or was held back) counts from now, not its schedule
            e.last_progress = max(intended, self.core.now)
        ctx.inflight.append(w)
        self.inflight += 1
        self.counts["submitted"] += 1
        return out + self._submit_posted(e)

    def _submit_posted(self, e: EngineState) -> list[Any]:
        """try_submit for one engine, its ELSP writes posted after the RAM stores."""
        writes: list[tuple[int, int]] = []
        out = self.try_submit(e, writes)
        if writes:
            out.append(self._post(writes, self._elsp_trace(e)))
        return out

    def _post(self, writes: list[tuple[int, int]], trace: int | None = None) -> Post:
        return self.core.post_batch([o for o, _ in writes], [4] * len(writes), [v for _, v in writes],
                                    trace)

    def _elsp_trace(self, *engines: EngineState) -> int:
        """The workloads an ELSP write submits are marked with its time; returns the trace id it
        carries: that of the first sampled workload among them (0: none; the others' traces end
        at the guest)."""
        trace = 0
        for e in engines:
            for c in e.submitted or ():
                for w in c.inflight:
                    if not w.elsp:
                        w.elsp, w.elsp_ns = True, self.core.now
                        trace = trace or w.trace
        return trace

    def _batch_page(self) -> int:
        for _ in range(i915.BATCH_PAGES):
            p = self.batch_next
            self.batch_next = (self.batch_next + 1) % i915.BATCH_PAGES
            if p not in self.batch_busy:
                self.batch_busy.add(p)
                return p
        raise GvtError("EAGAIN", "no free batch page")

    def _target(self, w: Workload, may_churn: bool) -> tuple[int, int]:
        """Where a store goes: a token slot of the 2 MiB page, or (the first store of a workload,
        when a churn page is mapped) a slot of a churn-mapped page."""
        if may_churn and self.churn_map:
            slots = [s for s in self.churn_map if s < 512 or self.pde3_present]
            if slots:
                slot = slots[int(self.core.rng.integers(len(slots)))]
                g = self.churn_map[slot]
                off = self.churn_off.get(g, 0)
                self.churn_off[g] = (off + 4) % PAGE_SIZE
                self.churn_busy[slot] = self.churn_busy.get(slot, 0) + 1
                w.churn_slot = slot
                return self.lay.churn_va(slot) + off, (g << PAGE_SHIFT) + off
        t = self.token_next
        self.token_next = (t + 1) % i915.TOKEN_SLOTS
        return self.lay.token_va(t), self.lay.token_gpa(t)

    def _ring_write(self, ctx: Context, data: bytes) -> list[Any]:
        out = []
        at = ctx.tail
        while data:
            k = min(len(data), i915.RING_SIZE - at)
            done = 0
            while done < k:
                page, off = divmod(at + done, PAGE_SIZE)
                n = min(k - done, PAGE_SIZE - off)
                out += self.store((ctx.ring_gfns[page] << PAGE_SHIFT) + off, data[done:done + n])
                done += n
            data = data[k:]
            at = (at + k) % i915.RING_SIZE
        ctx.tail = at
        return out

    def try_submit(self, e: EngineState, writes: list[tuple[int, int]]) -> list[Any]:
        """An ELSP for the engine's contexts with unsubmitted work, if the last one was
        acknowledged and the ports allow it (see the module doc). Returns the RAM stores (the
        contexts' tails) and adds the four ELSP writes to `writes`, to post after them."""
        if e.submitted is not None or e.resetting:
            return []
        ready = [c for c in e.contexts if c.tail != c.submitted_tail]
        if not ready:
            return []
        if not e.active:
            elems = ready[:2]
        elif len(e.active) == 1:
            run = e.active[0]
            elems = [run] + [c for c in ready if c is not run][:1]
        else:
            return []
        out: list[Any] = []
        for c in elems:
            out += self.store((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_TAIL, _I.pack(c.tail))
            c.submitted_tail = c.tail
        e.submitted = elems
        dws = lrc.elsp_dwords(elems[0].desc, elems[1].desc if len(elems) > 1 else None)
        elsp = regs.ring(e.name, regs.RING_ELSP)
        writes += [(elsp, d) for d in dws]
        return out

    # ---- ppgtt-churn ---------------------------------------------------------------------------------
    def churn(self) -> list[Any]:
        """Map or unmap a churn page (a tracked PTE write, 8 bytes or two 4-byte halves); now and
        then take PT 2 away from the PD and put it back."""
        lay, rng, ld = self.lay, self.core.rng, self.core.load
        self.counts["churn_ops"] += 1
        out: list[Any] = []
        if rng.random() < 1 / 16 and not any(s >= 512 for s in self.churn_busy):
            self.pde3_present = not self.pde3_present
            pde = lrc.entry(lay.pts[2], lrc.PTE_PRESENT | lrc.PTE_RW) if self.pde3_present else 0
            return self.store(lay.churn_pde_gpa, _Q.pack(pde))
        slot = int(rng.integers(i915.CHURN_SLOTS))
        if self.churn_busy.get(slot):
            return out                      # a workload in flight stores through it: leave it
        if slot in self.churn_map:
            del self.churn_map[slot]
            pte = 0
        else:
            g = lay.churn_pool[int(rng.integers(len(lay.churn_pool)))]
            self.churn_map[slot] = g
            pte = lrc.entry(g, lrc.PTE_PRESENT | lrc.PTE_RW)
        gpa = lay.churn_pte_gpa(slot)
        if rng.random() < ld.churn_halves_ratio:
            out += self.store(gpa, _I.pack(pte & 0xFFFFFFFF))
            out += self.store(gpa + 4, _I.pack(pte >> 32))
        else:
            out += self.store(gpa, _Q.pack(pte))
        return out

    # ---- interrupts and retirement ----------------------------------------------------------------
    def on_irq(self, now: int) -> Iterator[Any]:
        """The i915 interrupt handler, reduced: ack the GT IIR bits, read each engine's status
        page (CSB copy and seqnos), retire, check tokens, submit more. One runs at a time (the
        kernel's tasklet): an interrupt that comes meanwhile makes the running one go again."""
        if self.lay is None:
            return
        if self.irq_running:
            self.irq_again = True
            self.irq_now = now
            return
        self.irq_running = True
        try:
            while True:
                self.irq_again = False
                yield from self._irq_once(now)
                if not self.irq_again:
                    break
                now = self.irq_now            # the interrupt that came meanwhile
        finally:
            self.irq_running = False

    def _irq_once(self, now: int) -> Iterator[Any]:
        lay = self.lay
        self.irqs += 1
        bits = 0
        for name in lay.engines:
            _bank, b = regs.engine_event(name, regs.GT_USER_INTERRUPT | regs.GT_CONTEXT_SWITCH)
            bits |= b
        # the IIR ack, and the ELSPs this pass makes, go as one batch of posted writes
        writes: list[tuple[int, int]] = [(regs.gt_iir(0), bits)]
        submitted: list[EngineState] = []
        progressed = False
        n_dws = lrc.HWS_SEQNO_INDEX + len(lay.engines) * i915.CONTEXTS_PER_ENGINE
        for e in lay.engines.values():
            # the status page up to the seqnos: the CSB copy, its write pointer, the seqnos
            page = yield from self.ram.load(e.hwsp_gfn << PAGE_SHIFT, 4 * n_dws)
            dws = struct.unpack(f"<{n_dws}I", page)
            self._csb(e, dws)
            for c in e.contexts:
                seqno = dws[lrc.HWS_SEQNO_INDEX + _slot(lay, c)]
                done = [w for w in c.inflight if w.seq <= seqno]
                if done:
                    progressed = True
                    e.last_progress = now
                for w in done:
                    c.inflight.remove(w)
                    yield from self._retire(w, now)
                c.retired = max(c.retired, seqno)
            n = len(writes)
            for p in self.try_submit(e, writes):
                yield p
            if len(writes) > n:
                submitted.append(e)
        # the ELSPs go with the sampled workload they submit, not with this interrupt's
        yield self._post(writes, self._elsp_trace(*submitted))
        if not progressed:
            self.counts["empty_irqs"] += 1
        if self.irqs % CHECK_REGISTERS_EVERY == 0:
            yield from self._check_registers()

    def _csb(self, e: EngineState, dws: tuple) -> None:
        wp = dws[lrc.HWS_CSB_WRITE_INDEX] & 0x7
        if wp >= regs.RING_CSB_ENTRIES:
            return
        while e.csb_head != wp:
            e.csb_head = (e.csb_head + 1) % regs.RING_CSB_ENTRIES
            lo = dws[lrc.HWS_CSB_BUF0_INDEX + 2 * e.csb_head]
            if lo & (lrc.CSB_IDLE_TO_ACTIVE | lrc.CSB_LITE_RESTORE):
                if e.submitted is not None:
                    e.active, e.submitted = e.submitted, None
            if lo & lrc.CSB_CONTEXT_COMPLETE:
                if lo & lrc.CSB_ACTIVE_TO_IDLE:
                    e.active = []
                elif lo & lrc.CSB_ELEMENT_SWITCH and e.active:
                    e.active.pop(0)

    def _reset_csb_page(self, e: EngineState) -> list[Any]:
        """reset_csb_pointers: the status page's write pointer copy starts at the last entry, and
        every entry is invalidated (all ones), so that one no event has written since is told
        from one that an event wrote (a reboot keeps the page's old contents otherwise)."""
        base = (e.hwsp_gfn << PAGE_SHIFT) + 4 * lrc.HWS_CSB_BUF0_INDEX
        return (self.store(base, CSB_INVALID * regs.RING_CSB_ENTRIES)
                + self.store((e.hwsp_gfn << PAGE_SHIFT) + 4 * lrc.HWS_CSB_WRITE_INDEX,
                             _I.pack(regs.RING_CSB_ENTRIES - 1)))

    def _check_registers(self) -> Iterator[Any]:
        """Now and then, read the CSB pointer register and the entry it points at: when the
        status page shows the same write pointer, both copies must hold the same entry."""
        e = self.lay.engines[self.engines_used[0]]
        gen, irqs = self.reboots, self.irqs
        ptr = yield from self.core.read_reg(regs.ring(e.name, regs.RING_CSB_PTR))
        wp = ptr & regs.CSB_PTR_WRITE_MASK
        if wp >= regs.RING_CSB_ENTRIES:
            return
        reg = yield from self.core.read_reg(regs.ring(e.name, regs.RING_CSB) + 8 * wp, 8)
        page = yield from self.ram.load((e.hwsp_gfn << PAGE_SHIFT) + 4 * lrc.HWS_CSB_BUF0_INDEX, 64)
        hw_wp = _I.unpack(page[60:64])[0] & 0x7
        if gen != self.reboots:
            return              # the VM reset its vGPU meanwhile: the reads saw two devices
        again = yield from self.core.read_reg(regs.ring(e.name, regs.RING_CSB_PTR))
        if self.irqs != irqs or again != ptr or gen != self.reboots:
            return              # CSB events came between the reads (a slow trap: under a fault
                                # the buffer can wrap around to the same write pointer)
        if page[8 * wp:8 * wp + 8] == CSB_INVALID:
            return              # no event since the engine's reset: no entry to compare
        if hw_wp == wp and _Q.unpack(page[8 * wp:8 * wp + 8])[0] != reg:
            self.counts["csb_mismatches"] += 1
            self._reason(f"{e.name}: CSB entry {wp} is {reg:#x} in the register but "
                         f"{_Q.unpack(page[8 * wp:8 * wp + 8])[0]:#x} in the status page")

    def _retire(self, w: Workload, now: int) -> Iterator[Any]:
        ctx = w.ctx
        self._release(w)
        if w.bad:
            # it should have hung; it completed instead: its store went somewhere
            self.counts["misplaced"] += 1
            self._reason(f"a workload storing to unmapped PPGTT address {i915.VA_UNMAPPED:#x} completed")
        if w.tokens:
            got = []
            # consecutive token slots are read in one go
            runs: list[list[int]] = []
            for gpa, _tok in w.tokens:
                if runs and gpa == runs[-1][0] + 4 * runs[-1][1] and (gpa & (PAGE_SIZE - 1)):
                    runs[-1][1] += 1
                else:
                    runs.append([gpa, 1])
            for gpa, n in runs:
                got += struct.unpack(f"<{n}I", (yield from self.ram.load(gpa, 4 * n)))
            for (gpa, tok), val in zip(w.tokens, got):
                self.expect(gpa, _I.pack(tok))
                if val != tok:
                    self.counts["misplaced"] += 1
                    self._reason(f"token {tok:#x} of workload {ctx.ctx_id:#x}/{w.seq} is not at gpa "
                                 f"{gpa:#x} (found {val:#x})")
        self.expect((self.lay.engines[ctx.engine].hwsp_gfn << PAGE_SHIFT)
                    + 4 * (lrc.HWS_SEQNO_INDEX + _slot(self.lay, ctx)), _I.pack(w.seq))
        self.per_ctx.setdefault(ctx.ctx_id, [0, 0])[0] += 1
        self.counts["completed"] += 1
        self.inflight -= 1
        lat = now - w.intended
        self.recent_ns.append(now - w.elsp_ns)
        lab = (self.core.vm, ctx.engine, "guest")
        self.core.stats.hist(WORKLOAD_LATENCY, lab).record(lat)
        self.core.stats.inc(WORKLOADS, (self.core.vm, ctx.engine, "guest", "completed"))
        self.core.op_done("submit", now)
        self.core.workload_retired(now, failed=False)

    def typical_ns(self) -> int:
        """The median time the last RECENT workloads took from their ELSP write to their
        retirement (0 before any): how slow the mediator and the gpu are just now."""
        return int(statistics.median(self.recent_ns)) if self.recent_ns else 0

    def _release(self, w: Workload) -> None:
        for p in w.batches:
            self.batch_busy.discard(p)
        w.batches = []
        if w.churn_slot >= 0:
            # (a VM reset between a workload's failure and its release cleared the slots)
            left = self.churn_busy.get(w.churn_slot, 0) - 1
            if left > 0:
                self.churn_busy[w.churn_slot] = left
            else:
                self.churn_busy.pop(w.churn_slot, None)
            w.churn_slot = -1

    def _reason(self, r: str) -> None:
        if len(self.fail_reasons) < 32 or r in self.fail_reasons:
            self.fail_reasons[r] = self.fail_reasons.get(r, 0) + 1

    # ---- hang check ----------------------------------------------------------------------------------
    def tick(self, now: int) -> list[Any]:
        if self.lay is None:
            return []
        out: list[Any] = []
        limit = int(self.core.load.hang_timeout_s * 1e9)
        for e in self.lay.engines.values():
            busy = [w for c in e.contexts for w in c.inflight]
            if busy and not e.resetting and now - e.last_progress > limit:
                out += self._reset_engine(e, busy, now)
        return out

    def next_wake(self) -> int | None:
        """When the hang check must look again: the oldest engine progress plus the timeout."""
        if self.lay is None:
            return None
        limit = int(self.core.load.hang_timeout_s * 1e9)
        wakes = [e.last_progress + limit + 1 for e in self.lay.engines.values()
                 if not e.resetting and any(c.inflight for c in e.contexts)]
        return min(wakes) if wakes else None

    def _reset_engine(self, e: EngineState, busy: list[Workload], now: int) -> list[Any]:
        """i915's hang recovery, reduced (__intel_engine_reset_bh): reset the engine (GDRST), and
        only once the reset is done rewind each context's ring past what it threw away and resume
        the engine. Rewinding earlier would race the mediator: a completion it handles before
        the GDRST writes that workload's tail into the context as its ring head, over the
        rewind, and the next submission would run again what the reset threw away. Work queued
        meanwhile waits for the resume, and its commands stay (the rewind goes to each ring's
        tail as it was at the reset)."""
        e.resets += 1
        self.counts["resets"] += 1
        gone = self._fail_inflight(e, now, any(w.bad for w in busy),
                                   f"{e.name} hung: reset after {self.core.load.hang_timeout_s:g} s "
                                   f"without progress")
        marks = [(c, c.tail) for c in e.contexts]
        e.resetting = True
        gen = self.reboots

        def reset_done(status: str, p: dict) -> list[Any]:
            # the GPU may run a workload of the engine until the reset is done (GVT-g waits for
            # it before the GDRST completes): only then may its batch pages and churn slots
            # serve another workload
            for w in gone:
                self._release(w)
            if gen != self.reboots:
                return []           # the VM was reset meanwhile: its boot set the engine up
            e.resetting = False
            return self._rewind(marks) + self.resume_engine(e, self.core.now) + self._submit_posted(e)
        return [self.core.post_batch([regs.GDRST], [4], [i915.ENGINE_RESET_BIT[e.name]],
                                     on_done=reset_done)]

    def _rewind(self, marks: list[tuple[Context, int]]) -> list[Any]:
        """Each context's ring goes on past what a reset threw away (lrc_reset: head = tail)."""
        out: list[Any] = []
        for c, tail in marks:
            out += self.store((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_HEAD, _I.pack(tail))
            out += self.store((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_TAIL, _I.pack(tail))
            c.submitted_tail = tail
        return out

    def _fail_inflight(self, e: EngineState, now: int, meant: bool, reason: str) -> list[Workload]:
        """The engine's workloads will never complete (a reset takes them): each fails, and what
        it may still store (its tokens, its seqno) is left loose. Returns them: the caller gives
        back their pages once the reset is done."""
        gone: list[Workload] = []
        for c in e.contexts:
            if c.inflight:
                self.loosen((e.hwsp_gfn << PAGE_SHIFT) + 4 * (lrc.HWS_SEQNO_INDEX + _slot(self.lay, c)))
            for w in c.inflight:
                gone.append(w)
                for gpa, _tok in w.tokens:
                    self.loosen(gpa)
                self.per_ctx.setdefault(c.ctx_id, [0, 0])[1] += 1
                self.counts["failed"] += 1
                self.inflight -= 1
                if meant:
                    self.counts["failed_expected"] += 1
                self.core.stats.inc(WORKLOADS, (self.core.vm, e.name, "guest", "failed"))
                self.core.workload_retired(now, failed=True)
                self.core.op_done("submit", now, failed=not meant, reason=None if meant else reason)
            c.inflight.clear()
        return gone

    def resume_engine(self, e: EngineState, now: int) -> list[Any]:
        """After an engine reset: the CSB is empty again, and i915 resumes the engine as it first
        set it up (execlists_resume: run list enabled, the status page, the CSB pointers), which
        also restarts GVT-g's scheduling of the vGPU (a reset stops it)."""
        e.active, e.submitted = [], None
        e.csb_head = regs.RING_CSB_ENTRIES - 1
        out = self._reset_csb_page(e)
        out.append(self._post([(regs.ring(e.name, regs.RING_CSB_PTR), regs.csb_ptr_guest_reset()),
                               (regs.ring(e.name, regs.RING_MODE),
                                regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE)),
                               (regs.ring(e.name, regs.RING_HWS_PGA), e.hwsp_gm)]))
        e.last_progress = now
        return out

    def reboot(self, now: int, reason: str | None = None) -> None:
        """The VM was reset (VM_RESET): nothing of the GPU's state survived. Its workloads in
        flight failed (meant: the guest asked for it; or, with a reason, a fault took the vGPU);
        the next boot sets every object up again, its contexts' rings included."""
        self.reboots += 1
        if self.lay is None:
            return
        for e in self.lay.engines.values():
            for w in self._fail_inflight(e, now, reason is None, reason or ""):
                self._release(w)            # the VM reset is done: nothing runs any more
            e.active, e.submitted, e.resetting = [], None, False
            e.csb_head = regs.RING_CSB_ENTRIES - 1
        self.churn_map.clear()
        self.churn_busy.clear()
        self.pde3_present = True

    # ---- the end-of-run checks ----------------------------------------------------------------------
    def verify(self) -> Iterator[Any]:
        """Every page of this VM's RAM against the model; the counters against the completions;
        and a hash of the whole RAM (the same seed and ops give the same image on either fabric)."""
        frames = self.core.ram_frames
        sha = hashlib.sha256()
        violations, misplaced, reasons = 0, 0, []
        token_pages = set()
        if self.lay is not None:
            token_pages = set(range(i915.HUGE_GFN, i915.HUGE_GFN + 512)) | set(self.lay.churn_pool)
        for first in range(0, frames, SWEEP_PAGES):
            n = min(SWEEP_PAGES, frames - first)
            data = yield from self.ram.load_pages(first, n)
            sha.update(self._hashable(data, first, n))
            arr = np.frombuffer(data, dtype="<u4").reshape(n, PAGE_SIZE // 4)
            nz = np.flatnonzero(arr.any(axis=1))
            check = sorted(set((nz + first).tolist()) | {g for g in self.model if first <= g < first + n})
            for g in check:
                got = arr[g - first]
                page = self.model.get(g)
                want = np.frombuffer(bytes(page), dtype="<u4") if page is not None else np.zeros(1024, "<u4")
                diff = got != want
                loose = self.loose.get(g)
                if loose and diff.any():
                    for o in loose:
                        diff[o // 4] = False
                if diff.any():
                    violations += 1
                    k = int(np.flatnonzero(diff)[0])
                    if g in token_pages:
                        misplaced += int(diff.sum())
                    if len(reasons) < 8:
                        reasons.append(f"VM {self.core.vm} gfn {g:#x} dword {k}: holds {int(got[k]):#x}, "
                                       f"expected {int(want[k]):#x}")
        duplicated = 0
        if self.lay is not None:
            ctr = yield from self.ram.load(self.lay.counter_gfn << PAGE_SHIFT, PAGE_SIZE)
            for e in self.lay.engines.values():
                for c in e.contexts:
                    n = _I.unpack_from(ctr, 4 * _slot(self.lay, c))[0]
                    done, failed = self.per_ctx.get(c.ctx_id, [0, 0])
                    per = self.core.load.batches_per_workload
                    if n > (done + failed) * per:
                        duplicated += -(-(n - (done + failed) * per) // per)
                        reasons.append(f"context {c.ctx_id:#x}: its counter says {n} batches ran, "
                                       f"for {done} completed and {failed} failed workloads of {per}")
                    elif n < done * per:
                        misplaced += done - n // per
                        reasons.append(f"context {c.ctx_id:#x}: counter {n} is below its {done} "
                                       f"completed workloads of {per} batches")
        return {"pages_checked": frames, "violations": violations, "misplaced": misplaced,
                "duplicated": duplicated, "reasons": reasons, "sha256": sha.hexdigest()}

    def _hashable(self, data: bytes, first: int, n: int) -> bytes:
        """The pages as hashed: the status pages' CSB copy is left out. Which entries it holds
        depends on timing the kernel allows (a submission that reaches the mediator before or
        after the previous context completed is a lite restore or a fresh start), so two runs
        of the same seed and ops may differ there and only there."""
        if self.lay is None:
            return data
        buf = None
        for e in self.lay.engines.values():
            if first <= e.hwsp_gfn < first + n:
                if buf is None:
                    buf = bytearray(data)
                at = (e.hwsp_gfn - first) * PAGE_SIZE + 4 * lrc.HWS_CSB_BUF0_INDEX
                end = (e.hwsp_gfn - first) * PAGE_SIZE + 4 * (lrc.HWS_CSB_WRITE_INDEX + 1)
                buf[at:end] = bytes(end - at)
        return data if buf is None else bytes(buf)

    def report(self) -> dict:
        c = self.counts
        return {"submitted": c["submitted"], "completed": c["completed"], "failed": c["failed"],
                "failed_expected": c["failed_expected"],
                "lost": c["submitted"] - c["completed"] - c["failed"],
                "misplaced": c["misplaced"], "churn_ops": c["churn_ops"], "resets": c["resets"],
                "csb_mismatches": c["csb_mismatches"], "faults": self.ram.faults,
                "fail_reasons": dict(self.fail_reasons)}


def _slot(lay: i915.Layout, ctx: Context) -> int:
    return list(lay.engines).index(ctx.engine) * i915.CONTEXTS_PER_ENGINE + ctx.index
