"""The guest i915's execlist side: what it builds in its own RAM and GGTT to run work on the GPU,
how it submits, and how it retires what completed (gt/intel_execlists_submission.c, intel_lrc.c,
gen8 PPGTT), reduced to what the bench needs to prove every workload ran once, in the right place.

Built at boot, for each engine it uses: a hardware status page and, per context, a logical ring
context (2 pages: per-process status page, register state) and a 16 KiB ring, all in guest RAM and
mapped in the guest's GGTT (the first pages of its aperture share, never used by gtt-burst); one
4-level PPGTT shared by its contexts (as one GEM context has), announced with the PV page's G2V
notification. PPGTT address space:

  0x000000  PT 0: batch pages (4 KiB), and the page of per-context counters
  0x200000  a 2 MiB page: token slots the batches store into
  0x400000  PT 1 and PT 2: pages ppgtt-churn maps and unmaps (PT 2's PD entry comes and goes)
  0x800000  never mapped: where a batch meant to fail stores

A workload is a ring segment: for each batch an MI_BATCH_BUFFER_START (PPGTT) of a batch of
MI_STORE_DATA_IMM tokens and one MI_ATOMIC increment of its context's counter; then a seqno store
to the status page (GGTT) and MI_USER_INTERRUPT. Submission writes the ring and the context's
RING_TAIL in RAM, then the four ELSP dwords: both ports when two contexts have work, the running
context again with the new tail (lite restore) when it is the one with more work. A new ELSP waits
until the CSB has acknowledged the last one (idle_to_active or lite_restore).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from nodes.hw import PAGE_SHIFT, PAGE_SIZE, cmd, gtt, lrc, regs

ENGINE_RESET_BIT = {"rcs": regs.GRDOM_RENDER, "bcs": regs.GRDOM_BLT, "vcs": regs.GRDOM_MEDIA,
                    "vecs": regs.GRDOM_VECS}
CONTEXTS_PER_ENGINE = 2
RING_PAGES = 4
RING_SIZE = RING_PAGES * PAGE_SIZE
BATCH_PAGES = 64
VA_BATCH = 0x000000
VA_COUNTERS = 0x100000              # PT 0, entry 256
VA_TOKENS = 0x200000                # PD entry 1: a 2 MiB page
VA_CHURN = 0x400000                 # PD entries 2 and 3
VA_UNMAPPED = 0x800000
VA_ATTACK = 0x12C000                # PT 0, entries 300..303: the hostile mix's pages
ATTACK_PAGES = 4
ATTACK_SEQNO = 16                   # status page seqno slot (after the contexts') of an attack context
CHURN_SLOTS = 2 * lrc.ENTRIES_PER_TABLE
CHURN_POOL = 64                     # guest pages churn maps
TOKEN_SLOTS = (lrc.HUGE_2M // 4)
DRIVER_GGTT_PAGES = 64              # aperture pages the driver keeps for itself
FIRST_GFN = 16
HUGE_GFN = 512                      # the 2 MiB page's frames: 512..1023 (2 MiB aligned)
_I = struct.Struct("<I")
_Q = struct.Struct("<Q")


@dataclass(eq=False)
class Workload:
    seq: int                        # the context's seqno it stores when done
    ctx: "Context"
    intended: int
    tail: int                       # ring tail after it
    tokens: list[tuple[int, int]]   # (gpa, token) its stores write
    bad: bool = False               # meant to hang
    batches: list[int] = field(default_factory=list)    # batch page indices it uses
    churn_slot: int = -1
    trace: int = 0                  # its trace id, if the guest sampled it
    elsp: bool = False              # an ELSP write has submitted it
    elsp_ns: int = 0                # when the ELSP write that submits it went out


@dataclass(eq=False)
class Context:
    engine: str
    index: int                      # 0..CONTEXTS_PER_ENGINE-1
    ctx_id: int
    lrca: int                       # GGTT address of the context image
    lrc_gfns: list[int]
    ring_gm: int
    ring_gfns: list[int]
    counter_gpa: int
    tail: int = 0                   # where the next command goes
    submitted_tail: int = 0         # the tail the last ELSP carried
    seq: int = 0                    # last seqno used
    retired: int = 0                # last seqno seen done
    inflight: list[Workload] = field(default_factory=list)

    @property
    def desc(self) -> lrc.Descriptor:
        return lrc.descriptor(self.lrca, self.ctx_id)

    def ring_free(self) -> int:
        used = sum(_ring_len(w) for w in self.inflight)
        return RING_SIZE - 64 - used


def _ring_len(w: Workload) -> int:
    return 8 * (3 + len(w.batches) * 2)        # upper bound, in bytes


@dataclass(eq=False)
class EngineState:
    name: str
    hwsp_gm: int
    hwsp_gfn: int
    contexts: list[Context]
    active: list[Context] = field(default_factory=list)     # what the GPU runs, as the CSB told
    submitted: list[Context] | None = None                  # the ELSP not yet acknowledged
    csb_head: int = regs.RING_CSB_ENTRIES - 1
    last_progress: int = 0
    resets: int = 0
    resetting: bool = False     # a GDRST of the engine not yet done: nothing is submitted
    attack: Context | None = None                           # the hostile mix's own context


class Layout:
    """Where the driver's objects live: gfns, GGTT indices and PPGTT entries. Pure bookkeeping."""

    def __init__(self, vm: int, ram_frames: int, aperture_first_index: int, engines: tuple[str, ...],
                 attack: bool = False):
        if ram_frames < 2048:
            raise ValueError(f"VM {vm} needs at least 8 MiB of RAM for its GPU objects")
        self.vm = vm
        self.next_gfn = FIRST_GFN
        self.next_ggtt = aperture_first_index
        self.ggtt: list[tuple[int, int]] = []       # (GGTT index, gfn) of the driver's mappings
        self.pml4, self.pdp, self.pd = self.gfn(), self.gfn(), self.gfn()
        self.pts = [self.gfn() for _ in range(3)]   # PT 0 (batches), PT 1, PT 2 (churn)
        self.batch_gfns = [self.gfn() for _ in range(BATCH_PAGES)]
        self.counter_gfn = self.gfn()
        self.churn_pool = [self.gfn() for _ in range(CHURN_POOL)]
        self.engines: dict[str, EngineState] = {}
        for ei, e in enumerate(engines):
            hwsp_gfn = self.gfn()
            hwsp_gm = self.map_gm([hwsp_gfn])
            ctxs = []
            for k in range(CONTEXTS_PER_ENGINE):
                lrc_gfns = [self.gfn() for _ in range(lrc.LRC_PAGES)]
                lrca = self.map_gm(lrc_gfns)
                ring_gfns = [self.gfn() for _ in range(RING_PAGES)]
                ring_gm = self.map_gm(ring_gfns)
                slot = ei * CONTEXTS_PER_ENGINE + k
                ctxs.append(Context(e, k, (vm << 16) | (ei << 8) | (k + 1), lrca, lrc_gfns, ring_gm,
                                    ring_gfns, (self.counter_gfn << PAGE_SHIFT) + 4 * slot))
            self.engines[e] = EngineState(e, hwsp_gm, hwsp_gfn, ctxs)
            if attack and ei < 2:           # the hostile mix attacks from two engines at most
                lrc_gfns = [self.gfn() for _ in range(lrc.LRC_PAGES)]
                lrca = self.map_gm(lrc_gfns)
                ring_gfns = [self.gfn() for _ in range(RING_PAGES)]
                self.engines[e].attack = Context(e, CONTEXTS_PER_ENGINE, (vm << 16) | (ei << 8) | 0x80,
                                                 lrca, lrc_gfns, self.map_gm(ring_gfns), ring_gfns,
                                                 (self.counter_gfn << PAGE_SHIFT) + 4 * (64 + ei))
        self.attack_gfns = [self.gfn() for _ in range(ATTACK_PAGES)] if attack else []
        self.attack_gm = [self.map_gm([g]) for g in self.attack_gfns]
        if self.next_gfn > HUGE_GFN:
            raise ValueError("the driver's pages run into the 2 MiB token page")
        if self.next_ggtt - aperture_first_index > DRIVER_GGTT_PAGES:
            raise ValueError("the driver maps more GGTT pages than it keeps")

    def gfn(self) -> int:
        g = self.next_gfn
        self.next_gfn += 1
        return g

    def map_gm(self, gfns: list[int]) -> int:
        gm = gtt.gm_of(self.next_ggtt)
        for g in gfns:
            self.ggtt.append((self.next_ggtt, g))
            self.next_ggtt += 1
        return gm

    # ---- the PPGTT the driver builds ---------------------------------------------------------
    def ppgtt_pages(self) -> dict[int, np.ndarray]:
        """gfn -> the 512 entries of each table page, as first built."""
        flags = lrc.PTE_PRESENT | lrc.PTE_RW
        pml4 = np.zeros(512, dtype=np.uint64)
        pml4[0] = lrc.entry(self.pdp, flags)
        pdp = np.zeros(512, dtype=np.uint64)
        pdp[0] = lrc.entry(self.pd, flags)
        pd = np.zeros(512, dtype=np.uint64)
        pd[0] = lrc.entry(self.pts[0], flags)
        pd[1] = lrc.entry(HUGE_GFN, flags | lrc.PDE_PS_2M)
        pd[2] = lrc.entry(self.pts[1], flags)
        pd[3] = lrc.entry(self.pts[2], flags)
        pt0 = np.zeros(512, dtype=np.uint64)
        for k, g in enumerate(self.batch_gfns):
            pt0[(VA_BATCH >> PAGE_SHIFT) + k] = lrc.entry(g, flags)
        pt0[VA_COUNTERS >> PAGE_SHIFT] = lrc.entry(self.counter_gfn, flags)
        for k, g in enumerate(self.attack_gfns):
            pt0[(VA_ATTACK >> PAGE_SHIFT) + k] = lrc.entry(g, flags)
        empty = np.zeros(512, dtype=np.uint64)
        return {self.pml4: pml4, self.pdp: pdp, self.pd: pd, self.pts[0]: pt0,
                self.pts[1]: empty, self.pts[2]: empty.copy()}

    def churn_pte_gpa(self, slot: int) -> int:
        pt = self.pts[1 + slot // 512]
        return (pt << PAGE_SHIFT) + 8 * (slot % 512)

    @property
    def churn_pde_gpa(self) -> int:
        """PD entry 3: the one ppgtt-churn takes away and puts back (a table page unmapped)."""
        return (self.pd << PAGE_SHIFT) + 8 * 3

    def churn_va(self, slot: int) -> int:
        return VA_CHURN + slot * PAGE_SIZE

    def token_gpa(self, slot: int) -> int:
        return (HUGE_GFN << PAGE_SHIFT) + 4 * slot

    def token_va(self, slot: int) -> int:
        return VA_TOKENS + 4 * slot


def context_image(ctx: Context, pml4: int) -> bytes:
    """A fresh logical ring context: per-process status page and the register state."""
    state = [0] * (PAGE_SIZE // 4)
    state[lrc.CTX_RING_HEAD] = 0
    state[lrc.CTX_RING_TAIL] = 0
    state[lrc.CTX_RING_START] = ctx.ring_gm
    state[lrc.CTX_RING_CTL] = lrc.ring_ctl(RING_SIZE)
    state[lrc.CTX_PDP_UDW[0]] = pml4 >> 32
    state[lrc.CTX_PDP_LDW[0]] = pml4 & 0xFFFFFFFF
    return bytes(PAGE_SIZE) + struct.pack(f"<{len(state)}I", *state)


def batch_commands(stores: list[tuple[int, int]], counter_va: int, vertices: int = 0) -> bytes:
    """A batch: MI_STORE_DATA_IMM of each (PPGTT address, token), the counter increment, END;
    with `vertices`, a draw of that many first (render only: the GPU time it takes)."""
    out: list[int] = cmd.primitive(vertices) if vertices else []
    for va, tok in stores:
        out += cmd.store_dword(va, tok)
    out += cmd.atomic(counter_va, "inc")
    out.append(cmd.MI_BATCH_BUFFER_END.header())
    return cmd.encode(*out)


def spin_batch(va: int) -> bytes:
    """A batch that starts itself again: a workload that never ends (nothing but its hang
    detection stops it)."""
    return cmd.encode(*cmd.bb_start(va, ppgtt=True))


def ring_commands(batch_vas: list[int], seqno_gm: int, seqno: int) -> bytes:
    """A workload's ring segment, a multiple of 8 bytes (RING_TAIL is qword aligned): a PPGTT
    (non-privileged) batch start per batch, the seqno store to the status page (GGTT), and the
    user interrupt."""
    out: list[int] = []
    for va in batch_vas:
        out += cmd.bb_start(va, ppgtt=True)
    out += cmd.store_dword(seqno_gm, seqno, ggtt=True)
    out.append(cmd.MI_USER_INTERRUPT.header())
    if len(out) % 2:
        out.append(cmd.MI_NOOP.header())
    return cmd.encode(*out)


def token(vm: int, ctx_id: int, seq: int, k: int) -> int:
    """A nonzero 32-bit value that names its workload and store."""
    h = (vm * 0x9E3779B1 ^ ctx_id * 0x85EBCA77 ^ seq * 0xC2B2AE3D ^ k * 0x27D4EB2F) & 0xFFFFFFFF
    return h or 1
