"""An engine of the simulated GPU: execlist ports, a context status buffer, and a command
streamer that executes a context's ring and the batches it starts.

On the fourth ELSP write the engine loads element 0's context from its LRCA through the GGTT, runs
the ring from head to tail, saves the head back into the context image, and posts CSB entries
(idle_to_active, then context_complete with element_switch or active_to_idle) and an interrupt to
the mediator; element 1, if valid, runs next. Memory is reached through the GGTT (commands with
MI_USE_GGTT, the ring, the context) or the context's PPGTT (4 levels, 4 KiB and 2 MiB pages; or
legacy 3 levels), and written by DMA through the memory fabric.

A bad address or a command the engine does not know hangs that context only: it stops there, the
fault (address and reason) goes to the mediator with the interrupt, no completion is posted for
it, and the engine goes on with what comes next.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Iterator

from nodes.errors import GvtError
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, lrc, mi, regs

from nodes.memory import Fabric

if TYPE_CHECKING:
    from nodes.gpu.sim import GpuSim

_I = struct.Struct("<I")
_Q = struct.Struct("<Q")


class Hang(Exception):
    def __init__(self, addr: int, reason: str):
        super().__init__(reason)
        self.addr, self.reason = addr, reason


class GpuMemory:
    """The engines' DMA: reads and writes by machine frame through the fabric. Writes to memory
    that is not mapped here are gathered and sent in one go (before any read, so a read sees
    them); a fabric error is a hang at that address."""

    def __init__(self, fabric: Fabric):
        self.fabric = fabric
        self.pending: list[tuple[int, int, bytes]] = []
        self.bytes_written = 0

    def read(self, mfn: int, off: int, n: int) -> Iterator[Any]:
        view = self.fabric.local_view(mfn)
        if view is not None:
            return bytes(view[off:off + n])
        yield from self.flush()
        try:
            return (yield from self.fabric.read(mfn, off, n))
        except GvtError as err:
            raise Hang(mfn << PAGE_SHIFT | off, f"DMA read: {err.text}") from None

    def write(self, mfn: int, off: int, data: bytes) -> Iterator[Any]:
        self.bytes_written += len(data)
        view = self.fabric.local_view(mfn)
        if view is not None:
            view[off:off + len(data)] = data
            return
        if self.fabric.layout.region_of(mfn) is None:
            raise Hang(mfn << PAGE_SHIFT | off, f"DMA write to mfn {mfn:#x}, which is in no memory region")
        self.pending.append((mfn, off, data))
        if False:
            yield

    def flush(self) -> Iterator[Any]:
        if self.pending:
            ops, self.pending = self.pending, []
            try:
                yield from self.fabric.write_many(ops)
            except GvtError as err:
                raise Hang(ops[0][0] << PAGE_SHIFT, f"DMA write: {err.text}") from None


class Engine:
    def __init__(self, gpu: GpuSim, name: str):
        self.gpu, self.name = gpu, name
        self.base = regs.ENGINES[name]
        self.port = lrc.ElspPort()
        self.queue: list[tuple[lrc.Descriptor, lrc.Descriptor, int]] = []   # elements, trace id
        self.busy = False
        self.csb_wp = regs.CSB_PTR_RESET
        self.executed = 0
        self.hangs = 0
        self.user_irqs = 0

    def elsp_write(self, data: int, trace: int = 0) -> Iterator[Any] | None:
        elems = self.port.elsp_write(data)
        if elems is None:
            return None
        self.queue.append((*elems, trace))
        if self.busy:
            return None
        self.busy = True
        return self._run()

    def _run(self) -> Iterator[Any]:
        try:
            while self.queue:
                e0, e1, trace = self.queue.pop(0)
                csb: list[list[int]] = [[lrc.CSB_IDLE_TO_ACTIVE, 0]]
                faults: list[list] = []
                elems = [e for e in (e0, e1) if e.valid]
                for k, d in enumerate(elems):
                    try:
                        yield from self._execute(d)
                        last = k == len(elems) - 1
                        csb.append([lrc.CSB_CONTEXT_COMPLETE |
                                    (lrc.CSB_ACTIVE_TO_IDLE if last else lrc.CSB_ELEMENT_SWITCH), d.ctx_id])
                    except Hang as h:
                        self.hangs += 1
                        faults.append([d.ctx_id, h.addr, h.reason[:200]])
                for lo, hi in csb:
                    self._post_csb(lo, hi)
                yield self.gpu.irq(self.name, csb, faults, trace)
        finally:
            self.busy = False

    def _post_csb(self, lo: int, hi: int) -> None:
        self.csb_wp = 0 if self.csb_wp == regs.CSB_PTR_RESET else (self.csb_wp + 1) % regs.RING_CSB_ENTRIES
        r = self.gpu.regs
        at = self.base + regs.RING_CSB + 8 * self.csb_wp
        r[at], r[at + 4] = lo, hi
        ptr = self.base + regs.RING_CSB_PTR
        r[ptr] = (r.get(ptr, 0) & ~regs.CSB_PTR_WRITE_MASK) | self.csb_wp

    # ---- one context -------------------------------------------------------------------------
    def _execute(self, d: lrc.Descriptor) -> Iterator[Any]:
        mem = self.gpu.mem
        state_gm = d.lrca + lrc.LRC_STATE_PN * PAGE_SIZE
        raw = yield from mem.read(self._ggtt(state_gm), 0, 4 * lrc.CTX_STATE_DWORDS)
        st = struct.unpack(f"<{lrc.CTX_STATE_DWORDS}I", raw)
        head, tail = st[lrc.CTX_RING_HEAD] & lrc.RING_HEAD_OFF_MASK, st[lrc.CTX_RING_TAIL] & lrc.RING_TAIL_OFF_MASK
        start, size = st[lrc.CTX_RING_START], lrc.ring_size(st[lrc.CTX_RING_CTL])
        ctx = _Context(self, d.addressing, [lrc.pdp(list(st), n) for n in range(4)])
        ring = bytearray()
        at = head
        while at != tail:
            end = tail if tail > at else size
            n = min(end - at, PAGE_SIZE - ((start + at) & (PAGE_SIZE - 1)))
            ring += yield from mem.read(self._ggtt(start + at), (start + at) & (PAGE_SIZE - 1), n)
            at = (at + n) % size
        yield from ctx.run(bytes(ring), start + head, in_batch=False)
        yield from mem.flush()
        # context save: the engine has consumed the ring up to the tail
        yield from mem.write(self._ggtt(state_gm), 4 * lrc.CTX_RING_HEAD, _I.pack(tail))
        yield from mem.flush()
        self.executed += 1

    def _ggtt(self, gm: int) -> int:
        try:
            return self.gpu.gm_to_mfn(gm)
        except GvtError as err:
            raise Hang(gm, f"GGTT: {err.text}") from None


class _Context:
    """The state of one context while it runs: its address space and a small TLB."""

    def __init__(self, engine: Engine, addressing: int, pdps: list[int]):
        self.engine, self.addressing, self.pdps = engine, addressing, pdps
        self.tlb: dict[int, int] = {}
        self.mem = engine.gpu.mem

    def run(self, cmds: bytes, where: int, in_batch: bool) -> Iterator[Any]:
        words = struct.unpack(f"<{len(cmds) // 4}I", cmds)
        i, n = 0, len(words)
        while i < n:
            dw = words[i]
            op = mi.opcode_of(dw)
            ln = mi.length_of(dw)
            if i + ln > n:
                raise Hang(where + 4 * i, f"command {dw:#010x} runs past the end of the "
                           f"{'batch' if in_batch else 'ring'}")
            if op in (mi.MI_NOOP, mi.MI_ARB_CHECK):
                pass
            elif op == mi.MI_USER_INTERRUPT:
                self.engine.user_irqs += 1
            elif op == mi.MI_STORE_DATA_IMM:
                addr = words[i + 1] | words[i + 2] << 32
                data = struct.pack(f"<{ln - 3}I", *words[i + 3:i + ln])
                yield from self.store(addr, data, bool(dw & mi.MI_USE_GGTT))
            elif op == mi.MI_ATOMIC:
                if dw & mi.MI_ATOMIC_OP_MASK != mi.MI_ATOMIC_INC or ln != mi.LEN_ATOMIC:
                    raise Hang(where + 4 * i, f"MI_ATOMIC {dw:#010x}: only the increment is built")
                addr = words[i + 1] | words[i + 2] << 32
                mfn, off = yield from self.translate(addr, bool(dw & mi.MI_USE_GGTT))
                old = _I.unpack((yield from self.mem.read(mfn, off, 4)))[0]
                yield from self.mem.write(mfn, off, _I.pack((old + 1) & 0xFFFFFFFF))
            elif op == mi.MI_LOAD_REGISTER_IMM:
                for k in range(i + 1, i + ln - 1, 2):
                    self.engine.gpu.regs[words[k] & 0x7FFFFC] = words[k + 1]
            elif op == mi.MI_BATCH_BUFFER_END:
                if in_batch:
                    return
            elif op == mi.MI_BATCH_BUFFER_START:
                if in_batch:
                    raise Hang(where + 4 * i, "MI_BATCH_BUFFER_START inside a batch: only one "
                               "level of batches is built")
                addr = words[i + 1] | words[i + 2] << 32
                batch = yield from self.read_batch(addr, bool(dw & mi.MI_BATCH_PPGTT))
                yield from self.run(batch, addr, in_batch=True)
            else:
                raise Hang(where + 4 * i, f"unknown command {dw:#010x}")
            i += ln
        if in_batch:
            raise Hang(where + 4 * n, "batch ended without MI_BATCH_BUFFER_END")

    def store(self, addr: int, data: bytes, ggtt: bool) -> Iterator[Any]:
        if addr & 3:
            raise Hang(addr, "MI_STORE_DATA_IMM to an address that is not dword aligned")
        mfn, off = yield from self.translate(addr, ggtt)
        if off + len(data) > PAGE_SIZE:
            raise Hang(addr, "MI_STORE_DATA_IMM crosses a page")
        yield from self.mem.write(mfn, off, data)

    def read_batch(self, addr: int, ppgtt: bool) -> Iterator[Any]:
        out = bytearray()
        at, scanned = addr, 0
        while len(out) < mi.BATCH_MAX:
            mfn, off = yield from self.translate(at, not ppgtt)
            n = PAGE_SIZE - off
            out += yield from self.mem.read(mfn, off, n)
            end, scanned = mi.batch_end(out, scanned)
            if end is not None:
                return bytes(out[:end])
            at += n
        raise Hang(addr, f"no MI_BATCH_BUFFER_END in {mi.BATCH_MAX} bytes of batch")

    def translate(self, addr: int, ggtt: bool) -> Iterator[Any]:
        """(mfn, offset) of a GGTT or PPGTT address."""
        off = addr & (PAGE_SIZE - 1)
        if ggtt:
            return self.engine._ggtt(addr), off
        page = addr >> PAGE_SHIFT
        mfn = self.tlb.get(page)
        if mfn is None:
            mfn = self.tlb[page] = yield from self._walk(addr)
        return mfn, off

    def _walk(self, va: int) -> Iterator[Any]:
        """The PPGTT walk, on the shadow tables the mediator built."""
        if va >> lrc.VA_BITS:
            raise Hang(va, "PPGTT address above 48 bits")
        if self.addressing == lrc.ADDRESSING_LEGACY_64B:
            table, level = self.pdps[0] >> PAGE_SHIFT, 0
        elif self.addressing == lrc.ADDRESSING_LEGACY_32B:
            if va >> 32:
                raise Hang(va, "PPGTT address above 4 GiB in a legacy 32-bit context")
            table, level = self.pdps[(va >> 30) & 3] >> PAGE_SHIFT, 2
        else:
            raise Hang(va, f"context addressing mode {self.addressing} has no PPGTT")
        while True:
            i = lrc.level_index(va, level)
            try:
                e = _Q.unpack((yield from self.mem.read(table, 8 * i, 8)))[0]
            except GvtError as err:
                raise Hang(va, f"{lrc.LEVEL_NAMES[level]} table at mfn {table:#x}: {err.text}") from None
            if not e & lrc.PTE_PRESENT:
                raise Hang(va, f"PPGTT walk: {lrc.LEVEL_NAMES[level]} entry {i} is not present")
            if level == 3:
                return lrc.frame_of(e)
            if level == 2 and e & lrc.PDE_PS_2M:
                return ((e & lrc.ADDR_2M_MASK) >> PAGE_SHIFT) + ((va >> PAGE_SHIFT) & 511)
            table = lrc.frame_of(e)
            level += 1


