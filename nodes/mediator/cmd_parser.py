"""The command parser (gvt/cmd_parser.c): every workload's ring segment, and every privileged
batch it starts (second level and chained ones too), is scanned before anything of it is
dispatched, with the one command table (nodes.hw.cmd).

What a scan refuses, and with which code (the kernel's; -EBADRQC and -EFAULT send the vGPU to
failsafe, vgpu_is_vm_unhealthy):
- an unknown command, or one of the commands a guest may not use at all (MI_SEMAPHORE_WAIT,
  MI_STORE_DATA_INDEX, MI_UPDATE_GTT, MI_CLFLUSH, MI_REPORT_PERF_COUNT,
  MI_CONDITIONAL_BATCH_BUFFER_END, MI_OP_2E: unexpected_cmd): EBADRQC
- a command whose length is not its one valid length (gvt_check_valid_cmd_length): EFAULT
- register commands (cmd_reg_handler): a register past the MMIO range is EFAULT; one the register
  table does not mark for command access (F_CMD_ACCESS) EBADRQC; MI_STORE_REGISTER_MEM and
  MI_LOAD_REGISTER_MEM may name only GEN8_L3SQCREG4 and 0x21f0, and MI_LOAD_REGISTER_REG none
  (gen9): EPERM. An MI_LOAD_REGISTER_IMM value of a register with a write handler
  (F_CMD_WRITE_PATCH) goes through that handler, and the command is patched with what it made
  of it (a GFX_MODE enable of bit 0 is stripped and sends the vGPU to failsafe, as the trapped
  write does); the virtual register keeps its value. An LRI of PDP0's high dword must name one
  of the vGPU's PPGTTs and is patched with its shadow root (cmd_pdp_mmio_update_handler): EINVAL
  otherwise. An LRI of the MOCS ranges updates the virtual registers.
- GGTT addresses in commands (cmd_address_audit) must lie in the vGPU's aperture or hidden
  range: MI_STORE_DATA_IMM and MI_ATOMIC with the GGTT bit, LRM/SRM with it, the post-sync write
  of PIPE_CONTROL (global GTT) and MI_FLUSH_DW (GGTT bit), EFAULT otherwise; their status page
  index form (an offset under 4 KiB) is patched into the GGTT address of the engine's status
  page.
- MI_BATCH_BUFFER_START (cmd_handler_mi_batch_buffer_start): from a second-level batch, or a
  second-level one straight from the ring, EFAULT. A privileged batch (from the GGTT) is read
  through the vGPU's GGTT (EFAULT outside its memory), its length found by walking its commands
  to MI_BATCH_BUFFER_END or a chained MI_BATCH_BUFFER_START (find_bb_size), scanned, and copied;
  the command is patched to start the copy. A non-privileged batch (from the PPGTT) is neither
  scanned nor copied: the gpu runs it in place, as hardware runs it, without privilege.
- MI_USER_INTERRUPT (and the PIPE_CONTROL and MI_FLUSH_DW notify bits) becomes an event the
  mediator raises for the guest when the workload completes; the command itself is patched to
  MI_NOOP.

Where the kernel reads past what it copied (a command that runs past the ring's tail, an LRI
whose register/value pairs do not fill it) the bench refuses with EFAULT, and a status page
store by index before the guest set its RING_HWS_PGA is refused too (the kernel would patch it
to host GM). The bench bounds a scan: BATCHES_MAX privileged batches per workload (E2BIG), each
of at most cmd.BATCH_MAX bytes. Nothing here touches the pool: the scan gives the patched
buffers, and the scheduler places them when it dispatches the workload.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nodes.errors import GvtError
from nodes.hw import PAGE_SIZE, bar0, cmd, lrc, regs
from nodes.mediator import handlers

if TYPE_CHECKING:
    from nodes.mediator.ppgtt import PpgttMm
    from nodes.mediator.vgpu import VGpu

UNHEALTHY = frozenset({"EBADRQC", "EFAULT"})    # vgpu_is_vm_unhealthy: these send it to failsafe
BATCHES_MAX = 64                    # privileged batches one workload may start, chained ones too
MAX_SURFACE = 36 << 20              # device_info.max_surface_size
_ENGINE_OF = {base: name for name, base in regs.ENGINES.items()}


@dataclass(eq=False)
class Buffer:
    """A ring segment or a privileged batch, as the gpu will run it: its (patched) dwords, the
    batches it starts at dword i (their address goes in i + 1, i + 2 once they are placed), and
    the PDP LRIs whose values are the shadow roots of a PPGTT (dword i: high, i + 2: low)."""
    words: list[int]
    gm: int                                     # the guest GM it was read from
    batches: list[tuple[int, "Buffer"]] = field(default_factory=list)
    pdp_sites: list[tuple[int, "PpgttMm"]] = field(default_factory=list)

    def data(self) -> bytes:
        return struct.pack(f"<{len(self.words)}I", *self.words)


@dataclass(eq=False)
class Scan:
    """parser_exec_state: one workload's scan."""
    vgpu: VGpu
    engine: str
    mm: PpgttMm | None                          # the workload's PPGTT
    events: set[int] = field(default_factory=set)
    commands: int = 0
    batches: int = 0
    lri_mms: list["PpgttMm"] = field(default_factory=list)     # PPGTTs PDP LRIs name (refs held)


class _End:
    """The batch being scanned ends here (its chained MI_BATCH_BUFFER_START was handled)."""


END = _End()


def scan_ring(s: Scan, ring: bytes, start: int, head: int, size: int) -> Iterator[Any]:
    """Scan a workload's ring segment (its bytes from head to tail); returns its Buffer.
    Raises GvtError with the kernel's code; the caller decides about failsafe (UNHEALTHY)."""
    words = list(struct.unpack(f"<{len(ring) // 4}I", ring))
    buf = Buffer(words, start + head)

    def where(i: int) -> str:
        return f"ring GM {start + (head + 4 * i) % size:#x}"
    yield from _scan(s, buf, 0, where)
    return buf


def _scan(s: Scan, buf: Buffer, level: int, where: Callable[[int], str]) -> Iterator[Any]:
    """Scan one buffer: the ring (level 0), a batch (1) or a second-level batch (2)."""
    words = buf.words
    i, n = 0, len(words)
    while i < n:
        dw = words[i]
        c = cmd.lookup(dw, s.engine)
        if c is None:
            raise _err(s, "EBADRQC", f"unknown command {dw:#010x} at {where(i)}")
        ln = c.length(dw)
        if i + ln > n:
            raise _err(s, "EFAULT", f"{c.name} at {where(i)} runs past the "
                       f"{'ring tail' if level == 0 else 'batch end'}")
        if c.fixed and ln != c.fixed:
            raise _err(s, "EFAULT", f"{c.name} at {where(i)} is {ln} dwords, its one valid length "
                       f"is {c.fixed}")
        s.commands += 1
        if c.rule:
            r = _RULES[c.rule](s, buf, i, ln, level, where)
            if r is not None and not isinstance(r, _End):
                r = yield from r
            if r is END:
                return
        i += ln


def _err(s: Scan, code: str, text: str) -> GvtError:
    return GvtError(code, f"vGPU {s.vgpu.id} {s.engine}: {text}")


# ---- rules -------------------------------------------------------------------------------------
def _user_interrupt(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    s.events.add(regs.GT_USER_INTERRUPT)
    buf.words[i] = cmd.MI_NOOP.header()


def _bb_end(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> Any:
    if level == 0:
        raise _err(s, "EFAULT", f"MI_BATCH_BUFFER_END at {where(i)}: the ring is no batch")
    return END


def _unexpected(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    c = cmd.lookup(buf.words[i], s.engine)
    raise _err(s, "EBADRQC", f"unexpected {c.name if c else '?'} at {where(i)} in a command buffer")


def _bb_start(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> Iterator[Any]:
    w = buf.words
    dw = w[i]
    second = bool(dw & cmd.BB_SECOND_LEVEL)
    if level == 2:
        raise _err(s, "EFAULT", f"MI_BATCH_BUFFER_START at {where(i)} in a second-level batch")
    if level == 0 and second:
        raise _err(s, "EFAULT", f"MI_BATCH_BUFFER_START at {where(i)}: a second-level batch "
                   f"straight from the ring")
    chained = level == 1 and not second
    if dw & cmd.BB_PPGTT:
        # non-privileged: the gpu runs it from the PPGTT as it is (batch_buffer_needs_scan)
        return END if chained else None
    s.batches += 1
    if s.batches > BATCHES_MAX:
        raise _err(s, "E2BIG", f"more than {BATCHES_MAX} privileged batches in one workload")
    addr = cmd.address(w, i + 1)
    data = yield from _read_batch(s, addr)
    sub = Buffer(list(struct.unpack(f"<{len(data) // 4}I", data)), addr)
    yield from _scan(s, sub, 2 if second else 1, lambda k: f"batch GM {addr + 4 * k:#x}")
    buf.batches.append((i, sub))
    return END if chained else None


def _read_batch(s: Scan, addr: int) -> Iterator[Any]:
    """A privileged batch through the vGPU's GGTT, to its end (find_bb_size)."""
    out = bytearray()
    at, walked = addr, 0
    while len(out) < cmd.BATCH_MAX:
        n = PAGE_SIZE - (at & (PAGE_SIZE - 1))
        try:
            out += yield from s.vgpu.mem.read_gm(at, n)
        except GvtError as err:
            raise _err(s, "EFAULT", f"batch at GM {addr:#x}: {err.text}") from None
        try:
            end, walked = cmd.batch_extent(out, s.engine, walked)
        except cmd.UnknownCommand as unk:
            raise _err(s, "EBADRQC", f"unknown command {unk.dword:#010x} at batch GM "
                       f"{addr + 4 * walked:#x}") from None
        if end is not None:
            return bytes(out[:end])
        at += n
    raise _err(s, "E2BIG", f"the batch at GM {addr:#x} has no end in {cmd.BATCH_MAX} bytes")


def _reg(s: Scan, reg: int, kind: str, where: str, buf: Buffer | None = None, i: int = 0,
         k: int = 0) -> None:
    """cmd_reg_handler: may a command of `kind` name this register; for an LRI (dword i + k of buf
    names it), its value is checked and patched."""
    name = {"lri": "MI_LOAD_REGISTER_IMM", "lrr": "MI_LOAD_REGISTER_REG",
            "lrm": "MI_LOAD_REGISTER_MEM", "srm": "MI_STORE_REGISTER_MEM",
            "pipe_control": "PIPE_CONTROL"}[kind]
    if reg + 4 > bar0.MMIO_SIZE:
        raise _err(s, "EFAULT", f"{name} at {where}: register {reg:#x} is outside the MMIO range")
    info = handlers.MMIO.get(reg)
    if info is None or not info.cmd:
        raise _err(s, "EBADRQC", f"{name} at {where}: register {reg:#x} is not one a command may "
                   f"access (F_CMD_ACCESS)")
    if kind in ("srm", "lrm"):
        if reg not in handlers.SRM_LRM_ALLOWED:
            raise _err(s, "EPERM", f"{name} at {where}: register {reg:#x} may not be stored to or "
                       f"loaded from memory")
        return
    if kind == "lrr":
        raise _err(s, "EPERM", f"{name} at {where}: register {reg:#x}: no register may be copied "
                   f"to another by command")
    if kind == "pipe_control" or buf is None:
        return
    vgpu = s.vgpu
    w = buf.words
    base = regs.ENGINES[s.engine]
    if reg == base + regs.pdp_udw(0):
        _pdp_lri(s, buf, i, where)
    if any(a <= reg < a + n for a, n in handlers.MOCS_RANGES):
        vgpu.vregs[reg] = w[i + k + 1]
    if not info.cmd_patch or info.write is None:
        return
    if info.ro_mask:
        raise _err(s, "EBADRQC", f"{name} at {where}: register {reg:#x} is read-only")
    had = reg in vgpu.vregs
    old = vgpu.vregs.get(reg, 0)
    value = w[i + k + 1]
    try:
        info.write(vgpu, reg, value)        # a hook's actions (a kick) are not run from a scan
        new = vgpu.vregs.get(reg, 0)
    finally:
        if had:
            vgpu.vregs[reg] = old           # the scan only patches the command
        else:
            vgpu.vregs.pop(reg, None)
    if new != value:
        w[i + k + 1] = new


def _pdp_lri(s: Scan, buf: Buffer, i: int, where: str) -> None:
    """An LRI of PDP0's high dword loads a PPGTT root: the values in dwords 2 (high) and 4 (low)
    of the command must be the root of one of the vGPU's 4-level PPGTTs, and become its shadow
    root once the workload is dispatched (cmd_pdp_mmio_update_handler)."""
    if s.mm is None or s.mm.level != 0:
        raise _err(s, "EINVAL", f"MI_LOAD_REGISTER_IMM at {where}: a PDP load in a context that is "
                   f"not a 4-level PPGTT one")
    w = buf.words
    if i + 5 > len(w):
        raise _err(s, "EINVAL", f"MI_LOAD_REGISTER_IMM at {where}: a PDP load without both dwords")
    root = w[i + 2] << 32 | w[i + 4]
    mm = s.vgpu.ppgtt.find_mm(lrc.ADDRESSING_LEGACY_64B, [root, 0, 0, 0])
    if mm is None:
        raise _err(s, "EINVAL", f"MI_LOAD_REGISTER_IMM at {where}: PDP0 {root:#x} is no PPGTT of "
                   f"this vGPU")
    mm.refs += 1                            # held by the workload (lri_shadow_mm)
    s.lri_mms.append(mm)
    buf.pdp_sites.append((i + 2, mm))


def _lri(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    if ln % 2 == 0:
        raise _err(s, "EFAULT", f"MI_LOAD_REGISTER_IMM at {where(i)} of {ln} dwords: its "
                   f"register/value pairs do not fill it")
    for k in range(1, ln, 2):
        _reg(s, buf.words[i + k] & cmd.REG_MASK, "lri", where(i), buf, i, k)


def _lrr(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    _reg(s, buf.words[i + 1] & cmd.REG_MASK, "lrr", where(i))
    _reg(s, buf.words[i + 2] & cmd.REG_MASK, "lrr", where(i))


def _audit(s: Scan, name: str, gma: int, size: int, where: str, index_mode: bool = False) -> None:
    """cmd_address_audit: a GGTT address (and the bytes after it) a command accesses must lie in
    the vGPU's aperture or hidden range; an index is an offset in the status page."""
    if size > MAX_SURFACE:
        raise _err(s, "EFAULT", f"{name} at {where}: an access of {size} bytes")
    if index_mode:
        if gma >= PAGE_SIZE:
            raise _err(s, "EFAULT", f"malicious {name} at {where}: status page index {gma:#x} is "
                       f"past the page")
        return
    if not s.vgpu.ggtt.range_valid(gma, size):
        p = s.vgpu.part
        raise _err(s, "EFAULT", f"malicious {name} at {where}: GGTT address {gma:#x} (+{size}) is "
                   f"outside the vGPU's aperture {p.aperture_base:#x}+{p.aperture_size:#x} and "
                   f"hidden range {p.hidden_base:#x}+{p.hidden_size:#x}")


def _hws(s: Scan, name: str, where: str) -> int:
    hws = s.vgpu.hws_pga.get(s.engine)
    if hws is None:
        raise _err(s, "EFAULT", f"{name} at {where} stores to the status page by index, but the guest "
                   f"never set {s.engine}'s RING_HWS_PGA")
    return hws


def _lrm_srm(kind: str) -> Callable:
    def rule(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
        w = buf.words
        _reg(s, w[i + 1] & cmd.REG_MASK, kind, where(i))
        if w[i] & cmd.USE_GGTT:
            _audit(s, "MI_LOAD_REGISTER_MEM" if kind == "lrm" else "MI_STORE_REGISTER_MEM",
                   cmd.address(w, i + 2), 4, where(i))
    return rule


def _store_data_imm(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    w = buf.words
    if not w[i] & cmd.USE_GGTT:
        return
    valid = cmd.LEN_STORE_QWORD if w[i] & cmd.STORE_QWORD else cmd.LEN_STORE_DWORD
    if ln != valid:
        raise _err(s, "EFAULT", f"MI_STORE_DATA_IMM at {where(i)} is {ln} dwords, not {valid}")
    size = (ln - 3) * 4
    core = w[i + 1] & 1
    _audit(s, "MI_STORE_DATA_IMM", cmd.address(w, i + 1) + size * core, size, where(i))


def _atomic(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    w = buf.words
    if not w[i] & cmd.USE_GGTT:
        return
    valid = cmd.LEN_ATOMIC_INLINE if w[i] & cmd.ATOMIC_INLINE_DATA else cmd.LEN_ATOMIC
    if ln != valid:
        raise _err(s, "EFAULT", f"MI_ATOMIC at {where(i)} is {ln} dwords, not {valid}")
    size = (1 << ((w[i] >> cmd.ATOMIC_SIZE_SHIFT) & 3)) * 4
    _audit(s, "MI_ATOMIC", cmd.address(w, i + 1), size, where(i))


def _flush_dw(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    w = buf.words
    if ln not in (cmd.LEN_FLUSH_DW, cmd.LEN_FLUSH_DW + 1):
        raise _err(s, "EFAULT", f"MI_FLUSH_DW at {where(i)} is {ln} dwords, not 4 or 5")
    if (w[i] >> cmd.FLUSH_DW_OP_SHIFT) & 3 and w[i + 1] & cmd.FLUSH_DW_USE_GGTT:
        gma = (w[i + 1] & 0xFFFFFFF8) | (w[i + 2] & cmd.ADDR_HI_MASK) << 32
        index = bool(w[i] & cmd.FLUSH_DW_STORE_INDEX)
        _audit(s, "MI_FLUSH_DW", gma, 8, where(i), index)
        if index:
            w[i + 1] = ((_hws(s, "MI_FLUSH_DW", where(i)) + gma) & 0xFFFFFFF8) | cmd.FLUSH_DW_USE_GGTT
            w[i] &= ~cmd.FLUSH_DW_STORE_INDEX
    if w[i] & cmd.FLUSH_DW_NOTIFY and s.engine != "rcs":
        s.events.add(regs.GT_PIPE_NOTIFY)


def _pipe_control(s: Scan, buf: Buffer, i: int, ln: int, level: int, where: Callable) -> None:
    w = buf.words
    if ln < 4:
        raise _err(s, "EFAULT", f"PIPE_CONTROL at {where(i)} of {ln} dwords")
    flags = w[i + 1]
    op = (flags >> cmd.PC_POST_SYNC_SHIFT) & 3
    if flags & cmd.PC_MMIO_WRITE:
        _reg(s, w[i + 2] & cmd.REG_MASK, "pipe_control", where(i))
    elif op == 2:
        _reg(s, regs.PS_DEPTH_COUNT, "pipe_control", where(i))     # the depth count it writes
    elif op == 3:
        _reg(s, regs.ring("rcs", regs.RING_TIMESTAMP), "pipe_control", where(i))   # its timestamp
    elif op == 1 and flags & cmd.PC_GLOBAL_GTT:
        gma = (w[i + 2] & 0xFFFFFFF8) | (w[i + 3] & cmd.ADDR_HI_MASK) << 32
        index = bool(flags & cmd.PC_STORE_DATA_INDEX)
        _audit(s, "PIPE_CONTROL", gma, 8, where(i), index)
        if index:
            w[i + 2] = (_hws(s, "PIPE_CONTROL", where(i)) + gma) & 0xFFFFFFF8
            w[i + 1] = flags & ~cmd.PC_STORE_DATA_INDEX
    if flags & cmd.PC_NOTIFY:
        s.events.add(regs.GT_PIPE_NOTIFY)


_RULES: dict[str, Callable[..., Any]] = {
    "user_interrupt": _user_interrupt, "bb_end": _bb_end, "bb_start": _bb_start,
    "unexpected": _unexpected, "lri": _lri, "lrr": _lrr, "lrm": _lrm_srm("lrm"),
    "srm": _lrm_srm("srm"), "store_data_imm": _store_data_imm, "atomic": _atomic,
    "flush_dw": _flush_dw, "pipe_control": _pipe_control,
}
RULES = frozenset(_RULES)
assert {c.rule for c in cmd.TABLE if c.rule} <= RULES
