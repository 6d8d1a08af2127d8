"""MMIO emulation of a vGPU's registers (gvt/handlers.c): a table from register offset to its
attributes (reset value, read-only bits, masked) and hooks.

A write to a register in the table goes as intel_vgpu_mmio_reg_rw does: a fully read-only
register ignores it; read-only bits keep their value; the write hook (or a plain store) runs;
then, for a masked register, bits 31:16 of the written value select which of bits 15:0 change.
Registers outside the table are plain virtual registers. Two ranges take raw accesses through
their own hooks: the PV info page and the fence registers.

Hooks: read(vgpu, off, size) -> value; a dword write hook (vgpu, off, data); a range write hook
(vgpu, off, size, val). A write hook may return actions (a list or a generator of Call/Post),
which the caller performs in order: the fence hook posts the physical fence writes, the ELSP hook
submits workloads, the interrupt hooks may inject an MSI.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from nodes.errors import GvtError
from nodes.hw import bar0, lrc, pvinfo, regs
from nodes.mediator import interrupt
from nodes.mediator.aperture import write_fence
from nodes.regfile import read_dwords, write_dwords

if TYPE_CHECKING:
    from nodes.mediator.vgpu import VGpu

FAILSAFE_UNSUPPORTED_GUEST = "unsupported_guest"
FAILSAFE_INSUFFICIENT_RESOURCE = "insufficient_resource"
FAILSAFE_GUEST_ERR = "guest_error"

Actions = Iterable[Any] | None


@dataclass(frozen=True, slots=True)
class Submission:
    """An ELSP write's fourth dword: the two elements it submits. A hook returns it for the
    scheduler, which gets it with the trapped write's context (mmio.emulate_write)."""
    engine: str
    elems: tuple
DwordHook = Callable[["VGpu", int, int], Actions]


@dataclass(frozen=True, slots=True)
class MmioInfo:
    reset: int = 0
    ro_mask: int = 0            # bits a guest write cannot change; all ones: a read-only register
    masked: bool = False        # F_MODE_MASK
    write: DwordHook | None = None
    cmd: bool = False           # F_CMD_ACCESS: a guest's commands may name it
    cmd_patch: bool = False     # F_CMD_WRITE_PATCH: an LRI's value goes through `write` first


MMIO: dict[int, MmioInfo] = {}          # dword offset -> attributes


def _reg(off: int, size: int = 4, **attrs: Any) -> None:
    """Register `size` bytes at `off` with these attributes (added to any it has already)."""
    for d in range(off, off + size, 4):
        MMIO[d] = replace(MMIO[d], **attrs) if d in MMIO else MmioInfo(**attrs)


def _ring(rel: int, size: int = 4, **attrs: Any) -> None:
    """A per-ring register, for every engine (the kernel's MMIO_RING_*)."""
    for base in regs.ENGINES.values():
        _reg(base + rel, size, **attrs)


_ENGINE_OF = {base: name for name, base in regs.ENGINES.items()}


# ---- hooks ----------------------------------------------------------------------------------
def ring_mode_write(vgpu: VGpu, off: int, data: int) -> Actions:
    """GFX_MODE (ring_mode_mmio_write): a masked-enable of bit 0 is stripped and sends the vGPU to
    failsafe; enabling PPGTT or execlists before the guest read the PV page means it is not a
    GVT-g aware i915: failsafe too. The rest of the write lands either way. Enabling execlists
    (re)starts the vGPU's scheduling (intel_vgpu_start_schedule)."""
    vgpu.vregs[off] = data & ~regs.masked_enable(regs.GFX_MODE_BIT0)
    if regs.masked_bits_enabled(data, regs.GFX_MODE_BIT0):
        vgpu.enter_failsafe(FAILSAFE_UNSUPPORTED_GUEST)
        return None
    if (regs.masked_bits_enabled(data, regs.GFX_MODE_PPGTT_ENABLE)
            or regs.masked_bits_enabled(data, regs.GFX_MODE_RUN_LIST_ENABLE)) and not vgpu.pv_notified:
        vgpu.enter_failsafe(FAILSAFE_UNSUPPORTED_GUEST)
        return None
    if regs.masked_bits_enabled(data, regs.GFX_MODE_RUN_LIST_ENABLE):
        return vgpu.start_schedule()
    return None


def gdrst_write(vgpu: VGpu, off: int, data: int) -> Actions:
    """GDRST (gdrst_mmio_write): bit 0 resets the whole GT, the engine bits their engines; the
    register reads 0 afterwards, the acknowledgement the guest waits for."""
    vgpu.vregs[off] = data
    if data & regs.GRDOM_FULL:
        engines = frozenset(regs.ENGINES)
    else:
        engines = frozenset(e for bit, e in regs.GRDOM_ENGINES.items() if data & bit)
        if data & regs.GRDOM_GUC:
            vgpu.vregs[regs.GUC_STATUS] = vgpu.vregs.get(regs.GUC_STATUS, 0) | regs.GS_MIA_IN_RESET
    vgpu.vregs[off] = 0
    if engines:
        return vgpu.reset_engines(engines)
    return None


def elsp_write(vgpu: VGpu, off: int, data: int) -> Submission | None:
    """ELSP (elsp_mmio_write): the fourth dword submits the two elements as workloads."""
    engine = _ENGINE_OF[off - regs.RING_ELSP]
    elems = vgpu.execlists[engine].elsp_write(data)
    if elems is None:
        return None
    return Submission(engine, elems)


def hws_pga_write(vgpu: VGpu, off: int, data: int) -> None:
    """RING_HWS_PGA (hws_pga_write): the engine's status page, where the CSB is mirrored. An
    address outside the vGPU's graphics memory is refused and not stored."""
    engine = _ENGINE_OF[off - regs.RING_HWS_PGA]
    if not vgpu.ggtt.range_valid(data, 4096):
        raise GvtError("EINVAL", f"vGPU {vgpu.id} {engine}: HWSP address {data:#x} is outside its "
                       f"graphics memory")
    vgpu.vregs[off] = data
    vgpu.hws_pga[engine] = data


def force_wake_write(vgpu: VGpu, off: int, data: int) -> None:
    """A force-wake request (mul_force_wake_write) is acknowledged at once in its ack register,
    so a driver that spins on the ack proceeds."""
    old = vgpu.vregs.get(off, 0)
    mask = data >> 16
    new = (data & 0xFFFF0000) | (old & 0xFFFF & ~mask) | (data & mask)
    vgpu.vregs[off] = new
    vgpu.vregs[regs.FORCEWAKE_ACK[off]] = new & 0xFFFF


def force_nonpriv_write(vgpu: VGpu, off: int, data: int) -> None:
    """RING_FORCE_TO_NONPRIV (force_nonpriv_write): a slot may name only a register of the
    kernel's whitelist, or the engine's RING_NOPID; any other value is not stored."""
    reg = data & regs.FORCE_TO_NONPRIV_ADDR_MASK
    base = next(b for b in regs.ENGINES.values()
                if 0 <= off - b - regs.RING_FORCE_TO_NONPRIV < 4 * regs.RING_FORCE_TO_NONPRIV_SLOTS)
    if reg in FORCE_NONPRIV_WHITELIST or reg == base + regs.RING_NOPID:
        vgpu.vregs[off] = data


def csfe_chicken1_write(vgpu: VGpu, off: int, data: int) -> None:
    """CSFE_CHICKEN1 (csfe_chicken1_mmio_write): enabling bit 3 or 4 is stripped and means a
    guest the mediator cannot serve: failsafe."""
    vgpu.vregs[off] = data & ~regs.masked_enable(sum(regs.CSFE_CHICKEN1_FORBIDDEN))
    if any(regs.masked_bits_enabled(data, bit) for bit in regs.CSFE_CHICKEN1_FORBIDDEN):
        vgpu.enter_failsafe(FAILSAFE_UNSUPPORTED_GUEST)


def gamw_eco_write(vgpu: VGpu, off: int, data: int) -> None:
    """GAMW_ECO_DEV_RW_IA (gamw_echo_dev_rw_ia_write): 64 KiB pages are enabled on all engines
    or none; a partial IPS field is refused."""
    ips = data & regs.GAMW_ECO_ENABLE_64K_IPS_FIELD
    if ips not in (0, regs.GAMW_ECO_ENABLE_64K_IPS_FIELD):
        raise GvtError("EINVAL", f"vGPU {vgpu.id}: IPS field {ips:#x} of GAMW_ECO_DEV_RW_IA: 64 KiB "
                       f"pages are enabled for all engines together or not at all")
    vgpu.vregs[off] = data


def ips_enabled(vgpu: VGpu) -> bool:
    """vgpu_ips_enabled (gen9): the guest enabled 64 KiB pages."""
    ips = vgpu.vregs.get(regs.GAMW_ECO_DEV_RW_IA, 0) & regs.GAMW_ECO_ENABLE_64K_IPS_FIELD
    return ips == regs.GAMW_ECO_ENABLE_64K_IPS_FIELD


def pv_read(vgpu: VGpu, off: int, size: int) -> int:
    """Any read of the PV info page marks the guest as GVT-g aware (pvinfo_mmio_read)."""
    vgpu.pv_notified = True
    return read_dwords(vgpu.vregs, off, size)


def pv_write(vgpu: VGpu, off: int, size: int, val: int) -> Actions:
    """pvinfo_mmio_write: writes of any size land at the fields a guest may write; a write into
    rsv5 is a guest asking for resources it cannot have: failsafe; others are ignored."""
    rel = off - pvinfo.BASE
    if pvinfo.RSV5 <= rel < pvinfo.RSV5 + pvinfo.RSV5_SIZE:
        vgpu.enter_failsafe(FAILSAFE_INSUFFICIENT_RESOURCE)
        return
    if rel not in pvinfo.GUEST_WRITABLE:
        return
    write_dwords(vgpu.vregs, off, size, val)
    if rel == pvinfo.G2V_NOTIFY:
        vgpu.g2v_notifications.append(val & 0xFFFFFFFF)
        return g2v_notify(vgpu, val & 0xFFFFFFFF)
    return None


def g2v_notify(vgpu: VGpu, what: int) -> Actions:
    """handle_g2v_notification: PPGTT create takes a reference to the PPGTT whose roots are in
    the PV page's pdp fields (shadowing it if new), destroy drops one. Other values are ignored."""
    base = pvinfo.BASE + pvinfo.PDP0_LO
    pdps = [vgpu.vregs.get(base + 8 * n, 0) | vgpu.vregs.get(base + 8 * n + 4, 0) << 32 for n in range(4)]
    if what in (pvinfo.G2V_PPGTT_L4_CREATE, pvinfo.G2V_PPGTT_L3_CREATE):
        mode = lrc.ADDRESSING_LEGACY_64B if what == pvinfo.G2V_PPGTT_L4_CREATE else lrc.ADDRESSING_LEGACY_32B
        return _g2v_create(vgpu, mode, pdps)
    if what in (pvinfo.G2V_PPGTT_L4_DESTROY, pvinfo.G2V_PPGTT_L3_DESTROY):
        mode = lrc.ADDRESSING_LEGACY_64B if what == pvinfo.G2V_PPGTT_L4_DESTROY else lrc.ADDRESSING_LEGACY_32B
        mm = vgpu.ppgtt.find_mm(mode, pdps)
        if mm is None:
            raise GvtError("EINVAL", f"vGPU {vgpu.id}: PPGTT destroy for roots it never created")
        return vgpu.ppgtt.put_mm(mm)
    return None


def _g2v_create(vgpu: VGpu, mode: int, pdps: list[int]) -> Iterator[Any]:
    yield from vgpu.ppgtt.get_mm(mode, pdps)


def _fence_num(vgpu: VGpu, off: int) -> int:
    """The vGPU fence an access touches; past the vGPU's fences the access is refused, and a
    guest that never read the PV page is not GVT-g aware (sanitize_fence_mmio_access)."""
    n = (off - regs.FENCE_BASE) // regs.FENCE_STRIDE
    if n >= vgpu.part.fence_num:
        if not vgpu.pv_notified:
            vgpu.enter_failsafe(FAILSAFE_UNSUPPORTED_GUEST)
        raise GvtError("EINVAL", f"fence register {n} is past vGPU {vgpu.id}'s "
                       f"{vgpu.part.fence_num} fences")
    return n


def fence_read(vgpu: VGpu, off: int, size: int) -> int:
    _fence_num(vgpu, off)
    return read_dwords(vgpu.vregs, off, size)


def fence_write(vgpu: VGpu, off: int, size: int, val: int) -> Actions:
    """The vGPU's fence n is physical fence fence_base + n: the new value goes to the gpu."""
    n = _fence_num(vgpu, off)
    write_dwords(vgpu.vregs, off, size, val)
    lo = regs.fence_lo(n)
    value = vgpu.vregs.get(lo, 0) | vgpu.vregs.get(lo + 4, 0) << 32
    return write_fence(vgpu.part, n, value, vgpu.gpu, vgpu.id)


# ---- the table ------------------------------------------------------------------------------------
_ring(regs.RING_MODE, masked=True, write=ring_mode_write)
_ring(regs.RING_MI_MODE, masked=True)
_ring(regs.RING_INSTPM, masked=True)
_ring(regs.RING_EXECLIST_STATUS, regs.RING_EXECLIST_STATUS_SIZE, ro_mask=0xFFFFFFFF)
_ring(regs.RING_CSB, regs.RING_CSB_SIZE, ro_mask=0xFFFFFFFF)
_ring(regs.RING_CSB_PTR, masked=True, reset=regs.CSB_PTR_RESET)
_ring(regs.RING_IMR, reset=0xFFFFFFFF)
_ring(regs.RING_ELSP, write=elsp_write)
_ring(regs.RING_HWS_PGA, write=hws_pga_write)
_reg(regs.MASTER_IRQ, write=interrupt.master_irq_write)
for _isr in regs.IRQ_ISRS:
    _reg(_isr + regs.IMR_OFF, reset=0xFFFFFFFF, write=interrupt.imr_write)
    _reg(_isr + regs.IIR_OFF, write=interrupt.iir_write)
    _reg(_isr + regs.IER_OFF, write=interrupt.ier_write)
_reg(regs.GDRST, write=gdrst_write)
for _req in regs.FORCEWAKE_ACK:
    _reg(_req, write=force_wake_write)
_reg(regs.GAMW_ECO_DEV_RW_IA, write=gamw_eco_write)

# ---- command access (F_CMD_ACCESS, F_CMD_WRITE_PATCH): the registers a guest's commands may
# name, as handlers.c marks them for gen9 (D_ALL, D_BDW_PLUS and D_SKL_PLUS entries). The
# kernel also marks the registers of the host's golden context at its first scan (is_init_ctx);
# the bench has no golden context, so this table is the whole list.
_ring(regs.RING_MODE, cmd=True, cmd_patch=True)
_ring(regs.RING_MI_MODE, cmd=True)
_ring(regs.RING_INSTPM, cmd=True)
for _rel in (0x28, 0x134, 0x244, 0x40, 0x44, regs.RING_TIMESTAMP, regs.RING_TIMESTAMP + 4):
    _ring(_rel, cmd=True)
_ring(regs.RING_PDP0, 8 * regs.RING_PDPS, cmd=True)
_ring(regs.RING_CSFE_CHICKEN1, masked=True, cmd=True, cmd_patch=True, write=csfe_chicken1_write)
_reg(regs.ENGINES["rcs"] + regs.RING_FORCE_TO_NONPRIV, 4 * regs.RING_FORCE_TO_NONPRIV_SLOTS,
     cmd=True, cmd_patch=True, write=force_nonpriv_write)
for _off in (0x7008, 0x7000, 0x7004, 0x2120, 0x2124, 0x20DC, 0x2090, 0x2088, 0x20E4, 0x2470,
             0x7010, 0x7014, 0x7018, 0xE184, 0xE100, 0x4030, 0x7300, 0xE4F0, 0xE4F4, 0xE194,
             0xE188, 0xE180, 0x2580, 0x20E0, 0x20EC, 0x7304, 0x5588):
    _reg(_off, masked=True, cmd=True)           # masked chicken and mode registers
for _off in (0x4090, 0x9030, 0x20A0, 0x2420, 0x2430, 0x2434, 0x2438, 0x243C, 0x120000, 0x120008,
             0x940C, 0x215C, 0x2178, 0x217C, 0x12178, 0x1217C, 0x1C17C, 0x1C178, 0x22200, 0x4094,
             0x2220, 0x12220, 0x22220, 0x22178, 0x1A178, 0x1A17C, 0x2217C, 0x9430, regs.L3SQCREG4,
             0xE220, 0xE230, 0xE240, 0xE260, 0xE270, 0xE280, 0xE2A0, 0xE2B0, 0xE2C0, 0x21F0,
             0x4AB0, 0x4DDC, 0xB11C, 0x4DE0, 0x4DE4, 0x4DE8, 0x4DEC, 0x4DF0, 0x4DF4, 0xB004):
    _reg(_off, cmd=True)
_reg(0x2290, 8, cmd=True)
_reg(0x5200, 32, cmd=True)
_reg(0x5240, 32, cmd=True)
_reg(0x5280, 16, cmd=True)
_reg(0x2300, 0x58, cmd=True)                    # the 3D pipeline statistics counters
MOCS_RANGES = ((0xC800, 0x7F8), (0xB020, 0x80))  # is_mocs_mmio: an LRI there updates the vreg
for _start, _size in MOCS_RANGES:
    _reg(_start, _size, cmd=True)

# the registers a FORCE_TO_NONPRIV slot may name (handlers.c force_nonpriv_white_list)
FORCE_NONPRIV_WHITELIST = frozenset({
    0xD80, 0x20EC, 0x2248, 0x2340, 0x2348, 0x2350, 0x2580, 0x2690, 0x2694, 0x2698, 0x2754,
    0x28A0, 0x4DE0, 0x4DE4, 0x4DFC, 0x7010, 0x7014, 0x7300, 0x7304, 0x7700, 0x7704, 0x7708,
    0x770C, 0x83A8, 0xB110, 0xB118, 0xE100, 0xE18C, 0xE48C, 0xE5F4, 0x64844})
# MI_STORE_REGISTER_MEM and MI_LOAD_REGISTER_MEM may name only these (cmd_reg_handler, gen9)
SRM_LRM_ALLOWED = frozenset({regs.L3SQCREG4, 0x21F0})

# (start, end, read hook, write hook) of the ranges that take raw accesses
RANGES: tuple[tuple[int, int, Callable[..., int], Callable[..., Actions]], ...] = (
    (pvinfo.BASE, pvinfo.BASE + pvinfo.SIZE, pv_read, pv_write),
    (regs.FENCE_BASE, regs.FENCE_BASE + regs.FENCE_SLOTS * regs.FENCE_STRIDE, fence_read, fence_write),
)

RESET_VALUES = {off: info.reset for off, info in MMIO.items() if info.reset}
_RANGE_DWORDS = frozenset(o for start, end, _r, _w in RANGES for o in range(start, end, 4))


# ---- access ---------------------------------------------------------------------------------------
def mmio_read(vgpu: VGpu, off: int, size: int) -> int:
    for start, end, read, _write in RANGES:
        if start <= off < end:
            return read(vgpu, off, size)
    return read_dwords(vgpu.vregs, off, size)


def plain_dword(off: int) -> bool:
    """Whether an aligned dword at `off` is a register with no attributes and no hook, in no
    range: a write there only stores (the batch path takes these without the lookups)."""
    return (not off & 3 and 0 <= off < bar0.MMIO_SIZE and off not in MMIO
            and off not in _RANGE_DWORDS)


def mmio_write(vgpu: VGpu, off: int, size: int, val: int) -> Actions:
    """A guest write to a register (not in failsafe). Returns the actions a hook asked for."""
    for start, end, _read, write in RANGES:
        if start <= off < end:
            return write(vgpu, off, size, val)
    if size == 8:
        lo = _dword_write(vgpu, off, 4, val & 0xFFFFFFFF)
        hi = _dword_write(vgpu, off + 4, 4, val >> 32)
        # each half's hooks, in order (mmio.emulate_write runs them: a task fragment among them
        # must be run, not unpacked)
        return [a for a in (lo, hi) if a] or None
    return _dword_write(vgpu, off, size, val)


def _dword_write(vgpu: VGpu, off: int, size: int, val: int) -> Actions:
    base = off & ~3
    info = MMIO.get(base)
    if info is None:
        write_dwords(vgpu.vregs, off, size, val)
        return None
    if info.ro_mask == 0xFFFFFFFF:
        return None
    old = vgpu.vregs.get(base, 0)
    if size < 4:                # a narrower write changes its bytes of the register
        shift = (off & 3) * 8
        bytes_mask = ((1 << (8 * size)) - 1) << shift
        data = (old & ~bytes_mask) | ((val << shift) & bytes_mask)
    else:
        data = val & 0xFFFFFFFF
    if info.ro_mask:
        data = (data & ~info.ro_mask) | (old & info.ro_mask)
    actions = None
    if info.write is not None:
        actions = info.write(vgpu, base, data)
    else:
        vgpu.vregs[base] = data
    if info.masked:
        vgpu.vregs[base] = regs.masked_update(old, vgpu.vregs.get(base, 0))
    return actions


# ---- reset ----------------------------------------------------------------------------------------
def reset_mmio(vgpu: VGpu, dmlr: bool) -> None:
    """Registers back to their reset values (intel_vgpu_reset_mmio): all of them for a
    device-model reset, those below 0x44200 (the engines') for a GT reset."""
    if dmlr:
        vgpu.vregs.clear()
        vgpu.vregs.update(RESET_VALUES)
        return
    for off in [o for o in vgpu.vregs if o < regs.MMIO_RESET_LIMIT]:
        del vgpu.vregs[off]
    vgpu.vregs.update({o: v for o, v in RESET_VALUES.items() if o < regs.MMIO_RESET_LIMIT})


def populate_pvinfo(vgpu: VGpu) -> None:
    """The PV info page a guest reads to find it runs on GVT-g (populate_pvinfo_page). The
    fields a guest writes (g2v_notify, the PDPs, the execlist descriptor) are left alone."""
    p = vgpu.part
    fields = {
        pvinfo.MAGIC_OFF: pvinfo.MAGIC & 0xFFFFFFFF, pvinfo.MAGIC_OFF + 4: pvinfo.MAGIC >> 32,
        pvinfo.VERSION_MAJOR_OFF: pvinfo.VERSION_MAJOR | pvinfo.VERSION_MINOR << 16,
        pvinfo.DISPLAY_READY: 0, pvinfo.VGT_ID: vgpu.id, pvinfo.VGT_CAPS: pvinfo.CAPS,
        pvinfo.AVAIL_MAPPABLE_BASE: p.aperture_base, pvinfo.AVAIL_MAPPABLE_SIZE: p.aperture_size,
        pvinfo.AVAIL_NONMAPPABLE_BASE: p.hidden_base, pvinfo.AVAIL_NONMAPPABLE_SIZE: p.hidden_size,
        pvinfo.AVAIL_FENCE_NUM: p.fence_num,
        pvinfo.CURSOR_X_HOT: 0xFFFFFFFF, pvinfo.CURSOR_Y_HOT: 0xFFFFFFFF,
    }
    for rel, val in fields.items():
        vgpu.vregs[pvinfo.BASE + rel] = val
