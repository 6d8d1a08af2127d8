"""An engine of the simulated GPU: execlist ports, a context status buffer, and a command
streamer that executes a context's ring and the batches it starts.

On the fourth ELSP write the engine loads element 0's context from its LRCA through the GGTT, runs
the ring from head to tail, saves the head back into the context image, and posts CSB entries
(idle_to_active, then context_complete with element_switch or active_to_idle) and an interrupt to
the mediator; element 1, if valid, runs next. Commands are decoded with the one command table
(nodes.hw.cmd); the ring starts batches, a batch may chain to another or start a second-level
one, which returns to it. Memory is reached through the GGTT (the ring, the context, commands
with the GGTT bit) or the context's PPGTT (4 levels, 4 KiB and 2 MiB pages; or legacy 3
levels), and written by DMA through the memory fabric.

A bad address or a command the engine does not know hangs that context only: it stops there, the
fault (address and reason) goes to the mediator with the interrupt, no completion is posted for
it, and the engine goes on with what comes next.
"""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Iterator

from nodes.actions import Sleep
from nodes.errors import GvtError
from nodes.gpu.cost import SLICE_NS, SPIN_LOOK_S
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, cmd, lrc, regs

from nodes.memory import Fabric

if TYPE_CHECKING:
    from nodes.gpu.sim import GpuSim

_I = struct.Struct("<I")
_II = struct.Struct("<2I")
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
        self.executed = 0               # contexts run to their end
        self.commands = 0               # commands run, all contexts
        self.hangs = 0
        self.user_irqs = 0
        self.reset_gen = 0              # GDRSTs so far: a context started before one stops
        self.busy_ns = 0                # virtual time of the contexts it ran (the cost model)
        self.spins = 0                  # contexts that spun until a reset stopped them

    def reset(self) -> None:
        """GDRST of this engine: the ports, the queue and the CSB write pointer start over, and
        the context running now stops at its next command."""
        self.port = lrc.ElspPort()
        self.queue.clear()
        self.csb_wp = regs.CSB_PTR_RESET
        self.reset_gen += 1

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
                gen = self.reset_gen
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
                    except _Reset:
                        break
                if gen != self.reset_gen:
                    continue                # reset under it: nothing to report
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
        try:
            yield from ctx.run_ring(bytes(ring), start + head)
            yield from ctx.take_time(0)         # busy for what the context cost, then done
        finally:
            self.commands += ctx.executed
            self.busy_ns += ctx.cost_ns
        yield from mem.flush()
        if ctx.gen != self.reset_gen:
            raise _Reset()                  # no context save for a context reset under it
        # context save: the engine has consumed the ring up to the tail
        yield from mem.write(self._ggtt(state_gm), 4 * lrc.CTX_RING_HEAD, _I.pack(tail))
        yield from mem.flush()
        self.executed += 1

    def _ggtt(self, gm: int) -> int:
        try:
            return self.gpu.gm_to_mfn(gm)
        except GvtError as err:
            raise Hang(gm, f"GGTT: {err.text}") from None


# Commands one context may run before the engine gives up on it: a loop that does something each
# time round (a pure spin waits for its reset instead, nodes.gpu.cost), or a ring of a million
# commands, stops here as a hang instead of holding the engine for ever.
CMD_BUDGET = 1 << 20


class _Reset(Exception):
    """The engine was reset (GDRST) while the context ran."""


class _Chain:
    """A chained MI_BATCH_BUFFER_START: the batch that ran it ends, and this one goes on."""
    __slots__ = ("addr", "ppgtt")

    def __init__(self, addr: int, ppgtt: bool):
        self.addr, self.ppgtt = addr, ppgtt


class _Context:
    """The state of one context while it runs: its address space (the PPGTT roots, which an LRI
    of the engine's PDP registers changes), a small TLB, and how many commands it ran.

    The ring is privileged (GVT-g submits every context with the privilege bit), and so is a
    batch started from the GGTT. A batch started from the PPGTT is not: there the engine refuses,
    by stopping the context, what hardware refuses a non-privileged batch: a GGTT access, a
    register command naming a register that no FORCE_TO_NONPRIV slot of the engine names, a
    batch start from the GGTT, a store to the status page by index, a PIPE_CONTROL register
    write."""

    def __init__(self, engine: Engine, addressing: int, pdps: list[int]):
        self.engine, self.addressing, self.pdps = engine, addressing, pdps
        self.tlb: dict[int, int] = {}
        self.mem = engine.gpu.mem
        self.regs = engine.gpu.regs
        self.base = engine.base
        self.name = engine.name
        self.executed = 0
        self.gen = engine.reset_gen
        self.costs = engine.gpu.costs           # command -> ns (nodes.gpu.cost)
        self.cost = engine.gpu.cost
        self.cost_ns = 0                        # virtual time of what it ran so far
        self.slept_ns = 0                       # ...of which the engine has been busy for
        self.effects = 0                        # commands run that change memory or registers

    def take_time(self, slice_ns: int) -> Iterator[Any]:
        """Be busy for the cost run since the last time, once it reaches `slice_ns`."""
        due = self.cost_ns - self.slept_ns
        if due > slice_ns:
            self.slept_ns = self.cost_ns
            yield Sleep(due / 1e9)
            if self.engine.reset_gen != self.gen:
                raise _Reset()

    def spin(self) -> Iterator[Any]:
        """A batch that chains to itself having done nothing: the engine is busy until reset."""
        self.engine.spins += 1
        while self.engine.reset_gen == self.gen:
            yield Sleep(SPIN_LOOK_S)
            self.cost_ns += int(SPIN_LOOK_S * 1e9)
            self.slept_ns = self.cost_ns
        raise _Reset()

    def run_ring(self, cmds: bytes, where: int) -> Iterator[Any]:
        yield from self._run(cmds, where, 0, True)

    def _run(self, cmds: bytes, where: int, level: int, priv: bool) -> Iterator[Any]:
        """Commands of the ring (level 0), a first-level batch (1) or a second-level one (2).
        Returns at the end of the ring, at a batch's MI_BATCH_BUFFER_END, or with a _Chain."""
        words = struct.unpack(f"<{len(cmds) // 4}I", cmds)
        i, n = 0, len(words)
        what = ("ring", "batch", "second-level batch")[level]
        while i < n:
            dw = words[i]
            at = where + 4 * i
            c = cmd.lookup(dw, self.name)
            if c is None:
                raise Hang(at, f"unknown command {dw:#010x}")
            ln = c.length(dw)
            if i + ln > n:
                raise Hang(at, f"{c.name} runs past the end of the {what}")
            self.executed += 1
            if self.engine.reset_gen != self.gen:
                raise _Reset()
            if self.executed > CMD_BUDGET:
                raise Hang(at, f"the context ran {CMD_BUDGET} commands without ending")
            if c.run == "hang":
                raise Hang(at, f"{c.name} is not modelled by the simulated gpu")
            self.cost_ns += self.costs[c]
            if self.cost_ns - self.slept_ns >= SLICE_NS:
                yield from self.take_time(SLICE_NS - 1)
            if c.run == "exec":
                if c is cmd.MI_BATCH_BUFFER_END:
                    if level:
                        return None
                elif c is cmd.MI_BATCH_BUFFER_START:
                    chain = yield from self._bb_start(words, i, at, level, priv)
                    if chain is not None:
                        return chain
                else:
                    self.effects += 1
                    yield from _EXEC[c.name](self, words[i:i + ln], at, priv)
            i += ln
        if level:
            raise Hang(where + 4 * n, f"{what} ended without MI_BATCH_BUFFER_END")
        return None

    def _bb_start(self, words: tuple, i: int, at: int, level: int, priv: bool) -> Iterator[Any]:
        dw = words[i]
        addr = cmd.address(words, i + 1)
        ppgtt = bool(dw & cmd.BB_PPGTT)
        second = bool(dw & cmd.BB_SECOND_LEVEL)
        if not priv and not ppgtt:
            raise Hang(at, "privilege violation: a non-privileged batch started a batch from the GGTT")
        if level == 2:
            raise Hang(at, "MI_BATCH_BUFFER_START in a second-level batch")
        if level == 0 and second:
            raise Hang(at, "a second-level batch started from the ring")
        if level == 1 and not second:
            return _Chain(addr, ppgtt)          # this batch ends; the new one goes on
        sub = 2 if second else 1
        sub_priv = priv and not ppgtt
        while True:
            batch = yield from self.read_batch(addr, ppgtt)
            effects = self.effects
            chain = yield from self._run(batch, addr, sub, sub_priv)
            if chain is None:
                return None
            if chain.addr == addr and chain.ppgtt == ppgtt and self.effects == effects:
                yield from self.spin()          # it would run this batch again, and again
            if not sub_priv and not chain.ppgtt:
                raise Hang(addr, "privilege violation: a non-privileged batch chained to the GGTT")
            addr, ppgtt = chain.addr, chain.ppgtt
            sub_priv = sub_priv and not ppgtt

    # ---- memory ------------------------------------------------------------------------------
    def _space(self, ggtt: bool, priv: bool, at: int, name: str) -> bool:
        if ggtt and not priv:
            raise Hang(at, f"privilege violation: {name} with a GGTT address in a non-privileged batch")
        return ggtt

    def store(self, addr: int, data: bytes, ggtt: bool) -> Iterator[Any]:
        if addr & 3:
            raise Hang(addr, "a store to an address that is not dword aligned")
        mfn, off = yield from self.translate(addr, ggtt)
        if off + len(data) > PAGE_SIZE:
            raise Hang(addr, "a store that crosses a page")
        yield from self.mem.write(mfn, off, data)

    def load(self, addr: int, ggtt: bool) -> Iterator[Any]:
        mfn, off = yield from self.translate(addr, ggtt)
        return _I.unpack((yield from self.mem.read(mfn, off, 4)))[0]

    def _hwsp(self, offset: int, at: int) -> int:
        if offset >= PAGE_SIZE:
            raise Hang(at, f"a status page store by index at offset {offset:#x}, past the page")
        return self.regs.get(self.base + regs.RING_HWS_PGA, 0) + offset

    def read_batch(self, addr: int, ppgtt: bool) -> Iterator[Any]:
        out = bytearray()
        at, scanned = addr, 0
        while len(out) < cmd.BATCH_MAX:
            mfn, off = yield from self.translate(at, not ppgtt)
            n = PAGE_SIZE - off
            out += yield from self.mem.read(mfn, off, n)
            try:
                end, scanned = cmd.batch_extent(out, self.name, scanned)
            except cmd.UnknownCommand as unk:
                raise Hang(addr + 4 * scanned, f"unknown command {unk.dword:#010x}") from None
            if end is not None:
                return bytes(out[:end])
            at += n
        raise Hang(addr, f"no MI_BATCH_BUFFER_END in {cmd.BATCH_MAX} bytes of batch")

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
            if level == 1 and e & lrc.PDE_PS_2M:
                raise Hang(va, "PPGTT walk: a 1 GiB page, which the shadow never holds")
            table = lrc.frame_of(e)
            level += 1

    # ---- registers ---------------------------------------------------------------------------
    def _nonpriv_ok(self, reg: int) -> bool:
        """Whether a non-privileged batch may access `reg`: a FORCE_TO_NONPRIV slot names it."""
        first = self.base + regs.RING_FORCE_TO_NONPRIV
        nopid = self.base + regs.RING_NOPID
        return any((self.regs.get(first + 4 * k, nopid) & regs.FORCE_TO_NONPRIV_ADDR_MASK) == reg
                   for k in range(regs.RING_FORCE_TO_NONPRIV_SLOTS))

    def _reg_check(self, reg: int, priv: bool, at: int, name: str) -> None:
        if not priv and not self._nonpriv_ok(reg):
            raise Hang(at, f"privilege violation: {name} of register {reg:#x} in a non-privileged batch")

    def reg_read(self, reg: int) -> int:
        n = self._pdp_of(reg)
        if n is not None:
            return (self.pdps[n >> 1] >> (32 if n & 1 else 0)) & 0xFFFFFFFF
        return self.regs.get(reg, 0)

    def reg_write(self, reg: int, val: int) -> None:
        """A register write by a command. The engine's PDP registers are the live roots of the
        running context's PPGTT: a write to one changes its address space."""
        n = self._pdp_of(reg)
        if n is not None:
            k, shift = n >> 1, 32 if n & 1 else 0
            self.pdps[k] = (self.pdps[k] & ~(0xFFFFFFFF << shift)) | (val & 0xFFFFFFFF) << shift
            self.tlb.clear()
        self.regs[reg] = val & 0xFFFFFFFF

    def _pdp_of(self, reg: int) -> int | None:
        """2n (low) or 2n + 1 (high) for the engine's PDP n register, else None."""
        rel = reg - self.base - regs.RING_PDP0
        if 0 <= rel < 8 * regs.RING_PDPS:
            return rel >> 2
        return None


# ---- what each executed command does (the table's run == "exec") ----------------------------------
def _store_data_imm(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    ggtt = ctx._space(bool(w[0] & cmd.USE_GGTT), priv, at, "MI_STORE_DATA_IMM")
    n = len(w) - 3
    if n not in (1, 2) or (n == 2) != bool(w[0] & cmd.STORE_QWORD):
        raise Hang(at, f"MI_STORE_DATA_IMM of {len(w)} dwords")
    yield from ctx.store(cmd.address(w, 1), _I.pack(w[3]) if n == 1 else _II.pack(w[3], w[4]), ggtt)


def _lri(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    if len(w) % 2 == 0:
        raise Hang(at, f"MI_LOAD_REGISTER_IMM of {len(w)} dwords: its pairs do not fill it")
    ctx.cost_ns += (len(w) // 2) * ctx.cost.lri_ns
    for k in range(1, len(w), 2):
        reg = w[k] & cmd.REG_MASK
        ctx._reg_check(reg, priv, at, "MI_LOAD_REGISTER_IMM")
        ctx.reg_write(reg, w[k + 1])
    if False:
        yield


def _lrr(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    src, dst = w[1] & cmd.REG_MASK, w[2] & cmd.REG_MASK
    ctx._reg_check(src, priv, at, "MI_LOAD_REGISTER_REG")
    ctx._reg_check(dst, priv, at, "MI_LOAD_REGISTER_REG")
    ctx.reg_write(dst, ctx.reg_read(src))
    if False:
        yield


def _lrm(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    reg = w[1] & cmd.REG_MASK
    ctx._reg_check(reg, priv, at, "MI_LOAD_REGISTER_MEM")
    ggtt = ctx._space(bool(w[0] & cmd.USE_GGTT), priv, at, "MI_LOAD_REGISTER_MEM")
    ctx.reg_write(reg, (yield from ctx.load(cmd.address(w, 2), ggtt)))


def _srm(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    reg = w[1] & cmd.REG_MASK
    ctx._reg_check(reg, priv, at, "MI_STORE_REGISTER_MEM")
    ggtt = ctx._space(bool(w[0] & cmd.USE_GGTT), priv, at, "MI_STORE_REGISTER_MEM")
    yield from ctx.store(cmd.address(w, 2), _I.pack(ctx.reg_read(reg)), ggtt)


_ATOMIC = {cmd.ATOMIC_OPS["inc"]: lambda old, v: old + 1, cmd.ATOMIC_OPS["dec"]: lambda old, v: old - 1,
           cmd.ATOMIC_OPS["add"]: lambda old, v: old + v, cmd.ATOMIC_OPS["sub"]: lambda old, v: old - v,
           cmd.ATOMIC_OPS["move"]: lambda old, v: v, cmd.ATOMIC_OPS["and"]: lambda old, v: old & v,
           cmd.ATOMIC_OPS["or"]: lambda old, v: old | v, cmd.ATOMIC_OPS["xor"]: lambda old, v: old ^ v}


def _atomic(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    """MI_ATOMIC on a dword: the operand is inline data, else the engine's GPR0."""
    op = (w[0] & cmd.ATOMIC_OP_MASK) >> cmd.ATOMIC_OP_SHIFT
    fn = _ATOMIC.get(op)
    if fn is None or (w[0] >> cmd.ATOMIC_SIZE_SHIFT) & 3:
        raise Hang(at, f"MI_ATOMIC {w[0]:#010x}: only dword increment, decrement, add, sub, move, "
                   f"and, or, xor are modelled")
    inline = bool(w[0] & cmd.ATOMIC_INLINE_DATA)
    if len(w) != (cmd.LEN_ATOMIC_INLINE if inline else cmd.LEN_ATOMIC):
        raise Hang(at, f"MI_ATOMIC of {len(w)} dwords")
    ggtt = ctx._space(bool(w[0] & cmd.USE_GGTT), priv, at, "MI_ATOMIC")
    operand = w[3] if inline else ctx.regs.get(ctx.base + regs.RING_GPR0, 0)
    addr = cmd.address(w, 1)
    mfn, off = yield from ctx.translate(addr, ggtt)
    old = _I.unpack((yield from ctx.mem.read(mfn, off, 4)))[0]
    yield from ctx.mem.write(mfn, off, _I.pack(fn(old, operand) & 0xFFFFFFFF))


def _post_sync(ctx: _Context, op: int, addr: int, ggtt: bool, data: tuple) -> Iterator[Any]:
    """A post-sync write: 1 the immediate data, 2 a depth count, 3 a timestamp (qwords)."""
    if op == 1:
        payload = struct.pack(f"<{len(data)}I", *data)
    elif op == 3:
        payload = _Q.pack(ctx.engine.gpu.timestamp())
    elif op == 2:
        payload = _Q.pack(0)                    # a depth count of nothing drawn
    else:
        return
    yield from ctx.store(addr, payload, ggtt)


def _flush_dw(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    op = (w[0] >> cmd.FLUSH_DW_OP_SHIFT) & 3
    if not op:
        return
    if len(w) < cmd.LEN_FLUSH_DW:
        raise Hang(at, f"MI_FLUSH_DW with a post-sync write in {len(w)} dwords")
    if w[0] & cmd.FLUSH_DW_STORE_INDEX:
        if not priv:
            raise Hang(at, "privilege violation: MI_FLUSH_DW stores to the status page by index")
        addr, ggtt = ctx._hwsp(w[1] & 0xFFFFFFF8, at), True
    else:
        addr = (w[1] & 0xFFFFFFF8) | (w[2] & cmd.ADDR_HI_MASK) << 32
        ggtt = ctx._space(bool(w[1] & cmd.FLUSH_DW_USE_GGTT), priv, at, "MI_FLUSH_DW")
    yield from _post_sync(ctx, op, addr, ggtt, w[3:5])


def _pipe_control(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    if len(w) < cmd.LEN_PIPE_CONTROL:
        raise Hang(at, f"PIPE_CONTROL of {len(w)} dwords")
    flags = w[1]
    op = (flags >> cmd.PC_POST_SYNC_SHIFT) & 3
    if flags & cmd.PC_MMIO_WRITE:
        if not priv:
            raise Hang(at, "privilege violation: a PIPE_CONTROL register write in a non-privileged batch")
        ctx.reg_write(w[2] & cmd.REG_MASK, w[4])
        return
    if not op:
        return
    if flags & cmd.PC_STORE_DATA_INDEX:
        if not priv:
            raise Hang(at, "privilege violation: PIPE_CONTROL stores to the status page by index")
        addr, ggtt = ctx._hwsp(w[2] & 0xFFFFFFF8, at), True
    else:
        addr = (w[2] & 0xFFFFFFF8) | (w[3] & cmd.ADDR_HI_MASK) << 32
        ggtt = ctx._space(bool(flags & cmd.PC_GLOBAL_GTT), priv, at, "PIPE_CONTROL")
    yield from _post_sync(ctx, op, addr, ggtt, w[4:6])


def _primitive(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    """3DPRIMITIVE draws nothing here; it takes its vertices' time (dword 2 per instance, dword
    4 instances; an instance count of 0 means 1, as the hardware reads it)."""
    ctx.effects -= 1                            # it changes nothing a spin could depend on
    ctx.cost_ns += w[2] * max(1, w[4]) * ctx.cost.vertex_ns
    yield from ctx.take_time(SLICE_NS - 1)


def _user_interrupt(ctx: _Context, w: tuple, at: int, priv: bool) -> Iterator[Any]:
    ctx.engine.user_irqs += 1
    if False:
        yield


_EXEC = {"MI_STORE_DATA_IMM": _store_data_imm, "MI_LOAD_REGISTER_IMM": _lri,
         "MI_LOAD_REGISTER_REG": _lrr, "MI_LOAD_REGISTER_MEM": _lrm, "MI_STORE_REGISTER_MEM": _srm,
         "MI_ATOMIC": _atomic, "MI_FLUSH_DW": _flush_dw, "PIPE_CONTROL": _pipe_control,
         "MI_USER_INTERRUPT": _user_interrupt, "3DPRIMITIVE": _primitive}
