"""The simulated physical GPU: registers, the physical GGTT behind BAR0 + 8 MiB, and DMA by mfn
through the memory fabric. The mediator reaches it only through MMIO messages, like a host driver.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from nodes import hw
from nodes.errors import GvtError, need
from nodes.memory import Fabric
from nodes.regfile import read_dwords as _read_dwords, write_dwords as _write_dwords
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.stats import Stats
from nodes.wire.codec import Envelope


def check_access(off: int, size: int) -> None:
    if size not in (1, 2, 4, 8) or off % size:
        raise GvtError("EINVAL", f"BAR0 access of {size} bytes at {off:#x} is not a naturally aligned "
                       f"1, 2, 4 or 8 byte access")
    if not (0 <= off and off + size <= hw.BAR0_SIZE):
        raise GvtError("EFAULT", f"BAR0 offset {off:#x} is outside the 16 MiB BAR")
    if hw.MMIO_SIZE <= off < hw.GTT_OFFSET:
        raise GvtError("EFAULT", f"BAR0 offset {off:#x} is in the reserved hole between MMIO and GTT")


class GpuSim:
    role = "gpu"

    def __init__(self, fabric: Fabric, clock: Callable[[], int]):
        self.fabric = fabric
        self.clock = clock
        self.regs: dict[int, int] = {off: attrs[0] for off, attrs in hw.REG_ATTRS.items()}
        self.ggtt = np.zeros(hw.GGTT_ENTRIES, dtype=np.uint64)
        self.ggtt_flushes = 0
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        self.stats.counter("gvtbench_gpu_ggtt_writes", "Physical GGTT entries written")
        self.stats.counter("gvtbench_gpu_dma_bytes", "Bytes moved by DMA through the fabric", ["dir"])

    # ---- register and GGTT access --------------------------------------------------------
    def mmio_read(self, off: int, size: int) -> int:
        check_access(off, size)
        if off >= hw.GTT_OFFSET:
            e = int(self.ggtt[(off - hw.GTT_OFFSET) >> 3])
            shift = (off & 7) * 8
            return (e >> shift) & ((1 << (size * 8)) - 1)
        return _read_dwords(self.regs, off, size)

    def mmio_write(self, off: int, size: int, val: int) -> None:
        check_access(off, size)
        if off >= hw.GTT_OFFSET:
            i = (off - hw.GTT_OFFSET) >> 3
            shift = (off & 7) * 8
            mask = ((1 << (size * 8)) - 1) << shift
            e = int(self.ggtt[i])
            self.ggtt[i] = (e & ~mask & 0xFFFFFFFFFFFFFFFF) | ((val << shift) & mask)
            self.stats.inc("gvtbench_gpu_ggtt_writes")
            return
        if off == hw.GFX_FLSH_CNTL:
            self.ggtt_flushes += 1
        _write_dwords(self.regs, off, size, val)

    def ggtt_write_batch(self, offs: np.ndarray, vals: np.ndarray) -> None:
        if len(offs) != len(vals):
            raise GvtError("EINVAL", "MMIO_WRITE_BATCH has different numbers of offsets and values")
        if len(offs) == 0:
            return
        if int(offs.min()) < hw.GTT_OFFSET or int(offs.max()) >= hw.BAR0_SIZE or np.any(offs & 7):
            raise GvtError("EFAULT", "an 8-byte MMIO_WRITE_BATCH must hold aligned GTT window offsets")
        self.ggtt[(offs - hw.GTT_OFFSET) >> 3] = vals
        self.stats.inc("gvtbench_gpu_ggtt_writes", (), len(offs))

    def gm_to_mfn(self, gm: int) -> int:
        if not 0 <= gm < hw.GM_SIZE:
            raise GvtError("EFAULT", f"GM address {gm:#x} is outside the 4 GiB GGTT range")
        e = int(self.ggtt[gm >> hw.PAGE_SHIFT])
        if not e & hw.PTE_PRESENT:
            raise GvtError("EFAULT", f"GM address {gm:#x} hits a GGTT entry that is not present")
        return hw.pte_frame(e)

    # ---- messages ------------------------------------------------------------------------
    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        if kind == "MMIO_READ":
            off, size = need(p, "off", int), need(p, "size", int)
            v = self.mmio_read(off, size)
            self._observe(msg.vgpu, hw.trap_kind(off, False), now)
            return v
        if kind == "MMIO_WRITE":
            off = need(p, "off", int)
            self.mmio_write(off, need(p, "size", int), need(p, "val", int))
            self._observe(msg.vgpu, hw.trap_kind(off, True), now)
            return None
        if kind == "MMIO_WRITE_BATCH":
            offs = _u64_array(need(p, "off", bytes), "off")
            vals = _u64_array(need(p, "val", bytes), "val")
            self.ggtt_write_batch(offs, vals)
            self._observe(msg.vgpu, "gtt_write", now, len(offs))
            return None
        if kind == "GM_WRITE":
            return self._gm_write(need(p, "ops", (list, tuple)))
        if kind == "GM_READ":
            return self._gm_read(need(p, "ops", (list, tuple)))
        if kind == "GGTT_DUMP":
            start = p.get("start", 0) if isinstance(p, dict) else 0
            count = p.get("count", hw.GGTT_ENTRIES) if isinstance(p, dict) else hw.GGTT_ENTRIES
            if type(start) is not int or type(count) is not int or start < 0 or count < 0 \
                    or start + count > hw.GGTT_ENTRIES:
                raise GvtError("EINVAL", "GGTT_DUMP range is outside the GGTT")
            return self.ggtt[start:start + count].tobytes()
        if kind == "SYNC":
            return {"ggtt_flushes": self.ggtt_flushes}
        raise GvtError("ENOTSUP", f"the gpu does not handle {kind}")

    def _observe(self, vgpu: int, kind: str, start: int, n: int = 1) -> None:
        lab = (vgpu, kind, "gpu")
        self.stats.hist(TRAP_LATENCY, lab).record(self.clock() - start)
        self.stats.inc(TRAPS, lab, n)

    def _gm_write(self, ops: list) -> Any:
        """Writes through GM addresses: GGTT walk -> mfn -> DMA. All ops are checked first."""
        dma = []
        for op in ops:
            if not (isinstance(op, (list, tuple)) and len(op) == 2 and type(op[0]) is int
                    and isinstance(op[1], bytes)):
                raise GvtError("EINVAL", "GM_WRITE op must be [gm, data]")
            gm, data = op
            if (gm & 0xFFF) + len(data) > hw.PAGE_SIZE:
                raise GvtError("EINVAL", f"GM_WRITE at {gm:#x} crosses a page")
            dma.append((self.gm_to_mfn(gm), gm & 0xFFF, data))
        yield from self.fabric.write_many(dma)
        self.stats.inc("gvtbench_gpu_dma_bytes", ("write",), sum(len(d[2]) for d in dma))
        return [d[0] for d in dma]      # the machine frames hit, for the ledger

    def _gm_read(self, ops: list) -> Any:
        dma = []
        for op in ops:
            if not (isinstance(op, (list, tuple)) and len(op) == 2 and type(op[0]) is int
                    and type(op[1]) is int):
                raise GvtError("EINVAL", "GM_READ op must be [gm, length]")
            gm, n = op
            if n < 0 or (gm & 0xFFF) + n > hw.PAGE_SIZE:
                raise GvtError("EINVAL", f"GM_READ at {gm:#x} crosses a page")
            dma.append((self.gm_to_mfn(gm), gm & 0xFFF, n))
        data = yield from self.fabric.read_many(dma)
        self.stats.inc("gvtbench_gpu_dma_bytes", ("read",), sum(d[2] for d in dma))
        return data

    def snapshot(self) -> dict:
        return {"ggtt_flushes": self.ggtt_flushes}


def _u64_array(b: bytes, field: str) -> np.ndarray:
    if len(b) % 8:
        raise GvtError("EINVAL", f"field {field!r} must hold little-endian u64 values")
    return np.frombuffer(b, dtype="<u8")

