"""The simulated physical GPU: registers, the physical GGTT behind BAR0 + 8 MiB, engines with
execlist ports that execute contexts (nodes.gpu.engine), and DMA by mfn through the memory fabric.
The mediator reaches it only through MMIO messages, like a host driver, and hears from it through
ENGINE_IRQ.

A context submitted by a traced ELSP write runs as a traced task (the shell times the execution)
and its interrupt carries the same trace id.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from nodes.core import Core
from nodes.actions import Post, Spawn
from nodes.errors import GvtError
from nodes.gpu.cost import CostModel
from nodes.gpu.engine import Engine, GpuMemory
from nodes.hw import PAGE_SIZE, bar0, gtt, regs
from nodes.memory import Fabric
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.regfile import read_dwords, write_dwords
from nodes.stats import Stats
from nodes.wire.codec import Envelope, check_reply_size
from nodes.wire.schema import unpack_write_batch


MMIO_READ_BATCH_MAX = 4096      # registers one MMIO_READ_BATCH may read


class GpuSim(Core):
    role = "gpu"

    def __init__(self, fabric: Fabric, mediator: str = "mediator", cost: CostModel | None = None):
        super().__init__()
        self.cost = cost if cost is not None else CostModel()
        self.costs = self.cost.table()
        self.fabric, self.mediator = fabric, mediator
        self.mem = GpuMemory(fabric)
        self.engines = {name: Engine(self, name) for name in regs.ENGINES}
        self._elsp = {base + regs.RING_ELSP: self.engines[name] for name, base in regs.ENGINES.items()}
        self.regs: dict[int, int] = {}
        self.ggtt = np.zeros(gtt.ENTRIES, dtype=np.uint64)
        self.ggtt_flushes = 0
        self.resets = 0             # engine resets by GDRST
        self.trace = 0              # the sampled operation of the message being handled (if any)
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        self.stats.counter("gvtbench_gpu_ggtt_writes", "Physical GGTT entries written")
        self.stats.counter("gvtbench_gpu_dma_bytes", "Bytes moved by DMA through the fabric", ["direction"])

    # ---- register and GGTT access ----------------------------------------------------------
    def mmio_read(self, off: int, size: int) -> int:
        if bar0.decode(off, size) == "gtt":
            return gtt.bytes_of(int(self.ggtt[gtt.index_of(off)]), off, size)
        return read_dwords(self.regs, off, size)

    def mmio_write(self, off: int, size: int, val: int) -> None:
        if bar0.decode(off, size) == "gtt":
            i = gtt.index_of(off)
            self.ggtt[i] = gtt.with_bytes(int(self.ggtt[i]), off, size, val)
            self.stats.inc("gvtbench_gpu_ggtt_writes")
            return
        if off == regs.GFX_FLSH_CNTL:
            self.ggtt_flushes += 1
        if off == regs.GDRST and size == 4:
            self.gdrst(val)
            return
        engine = self._elsp.get(off)
        if engine is not None and size == 4:
            run = engine.elsp_write(val, self.trace)
            if run is not None:
                self.emit(Spawn(run, trace=self.trace, span=f"execute {engine.name}")
                                   if self.trace else run)
            return
        write_dwords(self.regs, off, size, val)

    def gdrst(self, val: int) -> None:
        """A reset of the whole GT (bit 0) or of the engines whose bits are set: each stops the
        context it runs at its next command, forgets its ports and queue, and posts nothing for
        what it dropped. The register reads 0 at once: the reset is done when the write is."""
        names = (list(self.engines) if val & regs.GRDOM_FULL else
                 [e for bit, e in regs.GRDOM_ENGINES.items() if val & bit and e in self.engines])
        for name in names:
            self.engines[name].reset()
        self.resets += len(names)
        self.regs[regs.GDRST] = 0

    def irq(self, engine: str, csb: list, faults: list, trace: int = 0) -> Post:
        """The engine's interrupt to the mediator, with the CSB entries it posted and the
        contexts it hung on; `trace`: that of the ELSP write that submitted them."""
        return Post(self.mediator, "ENGINE_IRQ", {"engine": engine, "csb": csb, "faults": faults},
                    trace=trace)

    def mmio_write_batch(self, offs: np.ndarray, sizes: np.ndarray, vals: np.ndarray) -> None:
        """Writes in order; runs of aligned 8-byte GGTT writes are stored in one go. The batch is
        checked whole first: a bad access refuses it all (EINVAL/EFAULT) and changes nothing."""
        if len(sizes) <= 16:                # a few register writes (an ELSP, say): no numpy
            ol, sl, vl = offs.tolist(), sizes.tolist(), vals.tolist()
            for off, size in zip(ol, sl):
                bar0.decode(off, size)
            for off, size, val in zip(ol, sl, vl):
                self.mmio_write(off, size, val)
            return
        codes = bar0.decode_many(offs, sizes)
        bad = np.flatnonzero(codes == bar0.BAD)
        if len(bad):
            bar0.decode(int(offs[bad[0]]), int(sizes[bad[0]]))     # raises with the reason
        whole = (codes == bar0.GTT) & (sizes == 8)
        if whole.all():
            self.ggtt[gtt.index_of(offs.astype(np.int64))] = vals
            self.stats.inc("gvtbench_gpu_ggtt_writes", (), len(offs))
            return
        for off, size, val in zip(offs.tolist(), sizes.tolist(), vals.tolist()):
            self.mmio_write(off, size, val)

    def mmio_read_batch(self, offs: np.ndarray) -> bytes:
        """Dword register reads, all checked first (EINVAL/EFAULT names the first bad one)."""
        if len(offs) > MMIO_READ_BATCH_MAX:
            raise GvtError("E2BIG", f"MMIO_READ_BATCH of {len(offs)} registers; at most "
                           f"{MMIO_READ_BATCH_MAX}")
        ol = offs.tolist()
        for off in ol:
            if bar0.decode(off, 4) != "mmio":
                raise GvtError("EINVAL", f"MMIO_READ_BATCH reads registers only; {off:#x} is not one")
        r = self.regs
        return np.fromiter((r.get(off, 0) for off in ol), dtype="<u4", count=len(ol)).tobytes()

    def timestamp(self) -> int:
        """The engines' timestamp: commands run so far by all of them (the gpu has no clock)."""
        return sum(e.commands for e in self.engines.values())

    def gm_to_mfn(self, gm: int) -> int:
        if not 0 <= gm < gtt.GM_SIZE:
            raise GvtError("EFAULT", f"GM address {gm:#x} is outside the 4 GiB GGTT range")
        e = int(self.ggtt[gtt.index_of_gm(gm)])
        if not e & gtt.PTE_PRESENT:
            raise GvtError("EFAULT", f"GM address {gm:#x} hits a GGTT entry that is not present")
        return gtt.frame_of(e)

    # ---- messages ------------------------------------------------------------------------
    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        self.trace = msg.trace
        if kind == "MMIO_READ":
            return self.mmio_read(p["off"], p["size"])
        if kind == "MMIO_WRITE":
            return self.mmio_write(p["off"], p["size"], p["val"])
        if kind == "MMIO_WRITE_BATCH":
            return self.mmio_write_batch(*unpack_write_batch(p))
        if kind == "MMIO_READ_BATCH":
            return self.mmio_read_batch(np.frombuffer(p["off"], dtype="<u4"))
        if kind == "GM_WRITE":
            return self._gm_write(p["ops"])
        if kind == "GGTT_DUMP":
            start, count = p["start"], p["count"]
            if start + count > gtt.ENTRIES:
                raise GvtError("EINVAL", f"GGTT_DUMP of {count} entries from {start} runs past the "
                               f"{gtt.ENTRIES} entries of the GGTT")
            check_reply_size(count * gtt.ENTRY_SIZE, 1, "GGTT_DUMP")
            return self.ggtt[start:start + count].astype("<u8").tobytes()
        if kind == "SYNC":
            return {"ggtt_flushes": self.ggtt_flushes}
        raise GvtError("ENOTSUP", f"the gpu does not handle {kind}")

    OBSERVED = frozenset({"MMIO_READ", "MMIO_WRITE", "MMIO_WRITE_BATCH"})

    def observe(self, msg: Envelope, result: Any, elapsed_ns: int) -> None:
        """The physical access, timed by the shell: the gpu stage of a trap."""
        kind = msg.kind
        if kind == "MMIO_READ" or kind == "MMIO_WRITE":
            p = msg.payload
            tk = bar0.trap_kind(bar0.decode(p["off"], p["size"]), kind == "MMIO_WRITE")
            n = 1
        elif kind == "MMIO_WRITE_BATCH":
            tk, n = "gtt_write", len(msg.payload["size"])
        else:
            return
        lab = (msg.vgpu, tk, "gpu")
        self.stats.hist(TRAP_LATENCY, lab).record(elapsed_ns, n)
        self.stats.inc(TRAPS, lab, n)

    def _gm_write(self, ops: list) -> Iterator[Any]:
        """Writes through GM addresses: GGTT walk -> mfn -> DMA. All ops are checked first."""
        dma = []
        for gm, data in ops:
            if (gm & (PAGE_SIZE - 1)) + len(data) > PAGE_SIZE:
                raise GvtError("EINVAL", f"GM_WRITE at {gm:#x} crosses a page")
            dma.append((self.gm_to_mfn(gm), gm & (PAGE_SIZE - 1), data))
        yield from self.fabric.write_many(dma)
        self.stats.inc("gvtbench_gpu_dma_bytes", ("write",), sum(len(d[2]) for d in dma))
        return [d[0] for d in dma]      # the machine frames hit, for the ledger

    def snapshot(self) -> dict:
        return {"ggtt_flushes": self.ggtt_flushes, "engine_resets": self.resets,
                "cost": self.cost.as_dict(),
                "engines": {n: {"executed": e.executed, "hangs": e.hangs, "user_irqs": e.user_irqs,
                                "busy_ns": e.busy_ns, "spins": e.spins}
                            for n, e in self.engines.items()},
                "dma_bytes_written": self.mem.bytes_written}
