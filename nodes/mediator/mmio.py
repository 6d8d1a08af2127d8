"""A vGPU's BAR0 accesses, as the mediator emulates them (gvt/mmio.c): the one BAR0 decode, then
the GGTT or the registers, or in failsafe the virtual copies only (failsafe_emulate_mmio_rw: no
read-only bits, no masking, no hooks, no shadowing)."""
from __future__ import annotations

from types import GeneratorType
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from nodes.actions import YIELD
from nodes.core import Ctx
from nodes.errors import GvtError
from nodes.hw import bar0, gtt
from nodes.mediator import handlers
from nodes.regfile import read_dwords, write_dwords

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu

# Work of one turn of a write batch before other vGPUs get theirs: single accesses count 1,
# entries of a run of 8-byte GGTT writes (vectorised) 1/32.
TURN_WORK = 128
GGTT_RUN_COST = 32
SMALL_BATCH = 32
ERRORS_KEPT = 8


def emulate_read(vgpu: VGpu, off: int, size: int) -> int:
    space = bar0.decode(off, size)
    if vgpu.failsafe is not None:
        if space == "gtt":
            return vgpu.ggtt.read_virtual(off, size)
        return read_dwords(vgpu.vregs, off, size)
    if space == "gtt":
        return vgpu.ggtt.read(off, size)
    return handlers.mmio_read(vgpu, off, size)


def emulate_write(vgpu: VGpu, off: int, size: int, val: int, ctx: Ctx) -> Iterator[Any] | None:
    """One write, in the context of the trapped message it came in; returns the task fragment
    its hooks need run (or None)."""
    space = bar0.decode(off, size)
    if vgpu.failsafe is not None:
        if space == "gtt":
            vgpu.ggtt.write_virtual(off, size, val)
        else:
            write_dwords(vgpu.vregs, off, size, val)
        return None
    if space == "gtt":
        out = vgpu.ggtt.write(off, size, val)
    else:
        out = handlers.mmio_write(vgpu, off, size, val)
    if out is None or type(out) is GeneratorType:
        return out                      # the common case: one task fragment, run as it is
    return _hooks(vgpu, out, ctx)


def _hooks(vgpu: VGpu, out: Any, ctx: Ctx) -> Iterator[Any]:
    """What a write's hooks asked for, run in order: actions, task fragments, lists of them, and
    an ELSP submission, which goes to the scheduler with the message's time and trace."""
    if type(out) is handlers.Submission:
        yield from vgpu.scheduler.submit(vgpu, out.engine, out.elems, ctx)
    elif type(out) is list or type(out) is tuple:
        for part in out:
            if part is not None:
                yield from _hooks(vgpu, part, ctx)
    elif hasattr(out, "send"):          # a task fragment: its yields get their answers
        yield from out
    else:
        yield out


def emulate_writes(vgpu: VGpu, offs: np.ndarray, sizes: np.ndarray, vals: np.ndarray,
                   ctx: Ctx) -> Iterator[Any]:
    """A batch of writes in guest order (a task). Runs of aligned 8-byte GGTT writes are shadowed
    as one vectorised update; a refused access is reported (a bit per write in `refused`, and the
    first ERRORS_KEPT reasons) and the rest still apply. Other vGPUs get a turn every TURN_WORK of
    work. A write that sent the vGPU to failsafe has its queued work failed after the batch.
    Returns the TRAP_WRITE reply."""
    n = len(offs)
    if n <= SMALL_BATCH:            # numpy's per-call overhead would dominate a few writes
        offs_l, sizes_l = offs.tolist(), sizes.tolist()
        run = [size == 8 and off % 8 == 0 and bar0.GTT_OFFSET <= off and off + 8 <= bar0.SIZE
               for off, size in zip(offs_l, sizes_l)]
        bounds = [0, *(i for i in range(1, n) if run[i] != run[i - 1]), n]
    else:
        codes = bar0.decode_many(offs, sizes)
        run = (codes == bar0.GTT) & (sizes == 8)
        bounds = [0, *(np.flatnonzero(np.diff(run.astype(np.int8))) + 1).tolist(), n]
    vals_l: list[int] | None = None     # Python lists, made when an access goes one by one
    n_mmio = n_gtt = 0
    errors: list[str] = []
    refused = bytearray()                   # a bit per write of the batch, once one is refused
    n_errors = work = 0
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        if run[a] and vgpu.failsafe is None:
            step = TURN_WORK * GGTT_RUN_COST
            for c in range(a, b, step):
                d = min(b, c + step)
                try:
                    yield from vgpu.ggtt.write_entries(gtt.index_of(offs[c:d].astype(np.int64)), vals[c:d])
                    n_gtt += d - c
                except GvtError as err:     # the run's pins could not be had: none of it applied
                    n_errors += d - c
                    if len(errors) < ERRORS_KEPT:
                        errors.append(str(err))
                    _mark(refused, n, c, d)
                work += (d - c) // GGTT_RUN_COST + 1
                if work >= TURN_WORK:
                    work = 0
                    yield YIELD
            continue
        if vals_l is None:
            offs_l, sizes_l, vals_l = offs.tolist(), sizes.tolist(), vals.tolist()
        vregs = vgpu.vregs
        plain = handlers.plain_dword
        for i in range(a, b):
            off, size = offs_l[i], sizes_l[i]
            if size == 4 and plain(off):
                # a register that only stores, in failsafe or not: the lookups of
                # emulate_write would come to this
                vregs[off] = vals_l[i] & 0xFFFFFFFF
                n_mmio += 1
                work += 1
                if work >= TURN_WORK:
                    work = 0
                    yield YIELD
                continue
            try:
                actions = emulate_write(vgpu, off, size, vals_l[i], ctx)
                if actions:
                    yield from actions
                if bar0.in_gtt(off):
                    n_gtt += 1
                else:
                    n_mmio += 1
            except GvtError as err:         # one bad access must not lose the rest of the batch
                n_errors += 1
                if len(errors) < ERRORS_KEPT:
                    errors.append(str(err))
                _mark(refused, n, i, i + 1)
            work += 1
            if work >= TURN_WORK:
                work = 0
                yield YIELD
    if vgpu.failsafe_pending:
        yield from vgpu.scheduler.kick(vgpu.id)
    return {"n": n, "n_errors": n_errors, "errors": errors, "refused": bytes(refused),
            "mmio": n_mmio, "gtt": n_gtt}


def _mark(bits: bytearray, n: int, a: int, b: int) -> None:
    """Writes a..b-1 of a batch of n were refused."""
    if not bits:
        bits.extend(bytes((n + 7) // 8))
    for i in range(a, b):
        bits[i >> 3] |= 1 << (i & 7)
