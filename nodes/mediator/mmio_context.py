"""The engine MMIO context (gvt/mmio_context.c): engine registers that are not part of a
context image, switched between vGPUs so that what one vGPU's commands (or its MMIO writes)
left in them is never seen under another's.

When an engine is about to run a workload of a vGPU other than the one that last owned it
(scheduler->engine_owner), intel_gvt_switch_mmio: for each register of that engine in the list
below, the physical value is saved into the outgoing vGPU's vreg (a masked register's mask half
cleared; a value its commands did not change since the restore leaves the vreg as the guest's
MMIO writes made it), or, when the host owned the engine, kept as the host's value; then the incoming vGPU's
vreg is written to the GPU (a masked register with its whole mask set), or the host's value when
the host takes the engine back (a vGPU whose scheduling stopped).

The list is the kernel's for gen9 (gen9_engine_mmio_list) for the engines the bench models. On
gen9 the registers marked in_context are saved and restored with the context image; the
simulated GPU's context image holds no engine registers, so here every register of the list is
switched, as gen8 switches them.

The switch costs one MMIO_READ_BATCH (the save, whose round trip is timed) and one
MMIO_WRITE_BATCH (the restore) to the gpu.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from nodes.actions import Call, Now, Post, Spawn
from nodes.errors import GvtError
from nodes.hw import regs
from nodes.metrics import MMIO_SWITCH_SECONDS
from nodes.wire.schema import pack_write_batch

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu


@dataclass(frozen=True)
class EngineMmio:
    engine: str
    reg: int
    mask: int           # a masked register's mask (its upper 16 bits enable the lower ones)
    in_context: bool


def _unmasked(m: EngineMmio, val: int) -> int:
    """A register's value without its mask half (a masked register's upper 16 bits)."""
    return val & ~(m.mask << 16) & 0xFFFFFFFF if m.mask else val


def _rcs(reg: int, mask: int = 0, in_context: bool = False) -> EngineMmio:
    return EngineMmio("rcs", reg, mask, in_context)


_RCS, _BCS, _VCS, _VECS = (regs.ENGINES[e] for e in ("rcs", "bcs", "vcs", "vecs"))
ENGINE_MMIO_LIST: tuple[EngineMmio, ...] = (
    _rcs(_RCS + regs.RING_MODE, 0xFFFF),                    # GFX_MODE 0x229c
    _rcs(0x2248),                                           # GEN9_CTX_PREEMPT_REG
    _rcs(0x2098),                                           # HWSTAM
    _rcs(_RCS + regs.RING_INSTPM, 0xFFFF, True),            # INSTPM 0x20c0
    *(_rcs(_RCS + regs.RING_FORCE_TO_NONPRIV + 4 * k)        # FORCE_TO_NONPRIV 0x24d0..0x24fc
      for k in range(regs.RING_FORCE_TO_NONPRIV_SLOTS)),
    _rcs(0x7004, 0xFFFF, True),                             # CACHE_MODE_1
    _rcs(0x7008, 0xFFFF, True),                             # GEN7_GT_MODE
    _rcs(0x7000, 0xFFFF, True),                             # CACHE_MODE_0_GEN7
    _rcs(0x7010, 0xFFFF, True),                             # GEN7_COMMON_SLICE_CHICKEN1
    _rcs(0x7300, 0xFFFF, True),                             # HDC_CHICKEN0
    _rcs(0x83A4, 0xFFFF, True),                             # VF_GUARDBAND
    _rcs(0x40E0),                                           # GEN8_PRIVATE_PAT_LO
    _rcs(0x40E4),                                           # GEN8_PRIVATE_PAT_HI
    _rcs(0x2580, 0xFFFF, True),                             # GEN8_CS_CHICKEN1
    _rcs(0x7014, 0xFFFF, True),                             # COMMON_SLICE_CHICKEN2
    _rcs(0x20EC, 0xFFFF),                                   # GEN9_CS_DEBUG_MODE1
    _rcs(0xB118),                                           # GEN8_L3SQCREG4
    _rcs(0xB11C),                                           # GEN9_SCRATCH1
    _rcs(0xB008),                                           # GEN9_SCRATCH_LNCF1
    _rcs(0xE100, 0xFFFF, True),                             # GEN7_HALF_SLICE_CHICKEN1
    _rcs(0xE180, 0xFFFF, True),                             # HALF_SLICE_CHICKEN2
    _rcs(0xE184, 0xFFFF, True),                             # GEN8_HALF_SLICE_CHICKEN3
    _rcs(0xE188, 0xFFFF, True),                             # GEN9_HALF_SLICE_CHICKEN5
    _rcs(0xE194, 0xFFFF, True),                             # GEN9_HALF_SLICE_CHICKEN7
    _rcs(0xE4F0, 0xFFFF, True),                             # GEN8_ROW_CHICKEN
    *(_rcs(r, 0, True) for r in (0x4DE0, 0x4DE4, 0x4DE8, 0x4DEC, 0x4DF0, 0x4DF4, 0x4DFC)),  # TR*
    EngineMmio("bcs", _BCS + regs.RING_MODE, 0xFFFF, False),        # 0x2229c
    EngineMmio("bcs", _BCS + regs.RING_MI_MODE, 0xFFFF, False),     # 0x2209c
    EngineMmio("bcs", _BCS + regs.RING_INSTPM, 0xFFFF, False),      # 0x220c0
    EngineMmio("bcs", _BCS + 0x98, 0, False),                       # HWSTAM 0x22098
    EngineMmio("bcs", _BCS + 0x28, 0xFFFF, False),                  # EXCC 0x22028
    EngineMmio("vecs", _VECS + 0x28, 0xFFFF, False),                # EXCC 0x1a028
    _rcs(0x7304, 0xFFFF, True),                             # GEN8_HDC_CHICKEN1
    _rcs(0x940C),                                           # GEN7_UCGCTL4
    _rcs(0x4AB8),                                           # GAMT_CHKN_BIT_REG
    _rcs(0x4AB0),                                           # GEN9_GAMT_ECO_REG_RW_IA
    _rcs(0x20D4, 0xFFFF),                                   # GEN9_CSFE_CHICKEN1_RCS
    _rcs(0x20D8, 0xFFFF, True),
    _rcs(0xB004),                                           # GEN8_GARBCNTL
    _rcs(0x20A0),                                           # GEN7_FF_THREAD_MODE
    _rcs(0x20E4, 0xFFFF),                                   # FF_SLICE_CS_CHICKEN2
)
BY_ENGINE: dict[str, tuple[EngineMmio, ...]] = {
    e: tuple(m for m in ENGINE_MMIO_LIST if m.engine == e) for e in regs.ENGINES}


class MmioContext:
    """The host's saved values (engine_mmio.value) and what the switches cost."""

    def __init__(self, gpu: str) -> None:
        self.gpu = gpu
        self.host: dict[int, int] = {}      # reg -> the host's value, saved when it gave the engine up
        self.switches = 0
        self.save_ns = 0                    # the saves' round trips to the gpu, all told
        self.save_failures = 0              # saves the gpu did not answer (it restarted)
        self.loaded: dict[str, dict[int, int]] = {}     # engine -> what the last restore wrote

    def switch(self, pre: VGpu | None, nxt: VGpu | None, engine: str) -> Iterator[Any]:
        """intel_gvt_switch_mmio(pre, next, engine): None is the host.

        The save reads the gpu's registers and the restore writes the incoming vGPU's values:
        the gpu takes its messages in order, so the read is sent first and the restore and the
        ELSP after it without waiting for its answer; the answer (which comes before anything
        the engine then does) fills the outgoing vGPU's vregs. The dispatch pays no round trip."""
        mmios = BY_ENGINE.get(engine, ())
        if not mmios or (pre is None and nxt is None):
            return
        offs = [m.reg for m in mmios]
        stats = (nxt if nxt is not None else pre).stats
        yield Spawn(self._save(pre, mmios, stats, engine, self.loaded.get(engine, {})))
        vals, loaded = [], {}
        for m in mmios:
            new = nxt.vregs.get(m.reg, 0) if nxt is not None else self.host.get(m.reg, 0)
            loaded[m.reg] = _unmasked(m, new)
            vals.append((new | m.mask << 16) & 0xFFFFFFFF if m.mask else new)
        self.loaded[engine] = loaded
        yield Post(self.gpu, "MMIO_WRITE_BATCH",
                   pack_write_batch(np.asarray(offs), np.full(len(offs), 4), np.asarray(vals)),
                   vgpu=nxt.id if nxt is not None else 0)
        self.switches += 1

    def _save(self, pre: VGpu | None, mmios: tuple[EngineMmio, ...], stats: Any,
              engine: str, loaded: dict[int, int]) -> Iterator[Any]:
        t0 = yield Now()
        try:
            raw = yield Call(self.gpu, "MMIO_READ_BATCH",
                             {"off": np.asarray([m.reg for m in mmios], dtype="<u4").tobytes()},
                             timeout=30)
        except GvtError:
            self.save_failures += 1     # the gpu restarted under it: its registers are gone too
            return
        for m, phys in zip(mmios, np.frombuffer(raw, dtype="<u4").tolist()):
            if pre is not None:
                val = _unmasked(m, phys)
                # a register its commands left as the restore wrote it keeps the vreg: what
                # the guest's MMIO writes put there since (the kernel takes the register
                # whatever, and so loses a guest's write made while it owned the engine, such
                # as turning execlists off)
                if loaded.get(m.reg) != val:
                    pre.vregs[m.reg] = val
            else:
                self.host[m.reg] = phys
        took = (yield Now()) - t0
        self.save_ns += took
        stats.hist(MMIO_SWITCH_SECONDS, (engine,)).record(took)
