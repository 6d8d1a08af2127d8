"""The `hostile` load mix: a guest that attacks the mediator the way a malicious VM would, among its
normal work, and records what became of each attempt.

Each `hostile` operation is the next attack of a campaign (it completes at once; the attacks run
one after another in a task of their own, so the mix's weight is the share of operations that
attack). An attack waits until the guest's engines are idle and holds back the guest's other GPU
work while it runs, so what it observes is its own (the register and GGTT load goes on):
- refused: the ELSP (or the page-table store, the G2V notification) came back `refused` in
  WRITE_DONE, and the vGPU is not in failsafe;
- failsafe: the vGPU went to failsafe. A malicious guest can tell: in failsafe a masked register
  keeps what is written to it raw, so a write of mask bits alone reads back as written;
- failed: accepted, but it never completed (the gpu stopped the context, or a reset took it);
  the guest resets the engine as i915 would;
- contained: accepted and completed; what it wrote stayed in its own memory (the isolation sweep
  checks every page of every VM and of the host pool).

Every attack has the outcomes the kernel gives it (EXPECT); anything else is counted as
unexpected, and the ledger fails the run on it. After a failsafe outcome the guest resets its VM
(VM_RESET: the device-model reset a reboot triggers) and boots again, so that every attack that
sends a vGPU to failsafe gets tried; the campaign ends with one, so the vGPU ends in failsafe, as
the kernel leaves it. Only the bytes an attack may write (its own pages, its seqno slot, its ring
head) are left loose in the guest's model of its RAM: the rest of the attacker's RAM must stay
exact too.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nodes.actions import Call, Event, Signal, Sleep, Wait
from nodes.errors import GvtError
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, cmd, lrc, partition, pvinfo, regs
from nodes.guest import i915

if TYPE_CHECKING:
    from nodes.guest.core import GuestCore

_I = struct.Struct("<I")
_Q = struct.Struct("<Q")
OUTCOMES = ("refused", "failsafe", "failed", "contained")
PROBE_REG = regs.ring("vecs", regs.RING_INSTPM)     # a masked register no workload uses
HOST_GM = 0x1000                                    # host GM: where the mediator maps its pool
G2V_FLOOD = 160                                     # PPGTTs the flood announces
TYPICAL_FACTOR = 5                                  # an attack's wait, in typical workload times


@dataclass(frozen=True)
class Attack:
    kind: str
    expect: frozenset[str]              # what the kernel makes of it
    what: str
    engine: str = "rcs"

    @property
    def failsafe(self) -> bool:
        return "failsafe" in self.expect


def _a(kind: str, expect: str, what: str, engine: str = "rcs") -> Attack:
    return Attack(kind, frozenset(expect.split("|")), what, engine)


ATTACKS: tuple[Attack, ...] = (
    _a("srm-unlisted", "refused", "MI_STORE_REGISTER_MEM of a register it may not store (EPERM)"),
    _a("ring-outside", "refused", "a context whose ring is in host GM (EINVAL)"),
    _a("lrca-outside", "refused", "an ELSP element whose LRCA is in host GM (EINVAL)"),
    _a("elsp-before-execlists", "refused", "an ELSP with execlists off on the engine (EINVAL)", "bcs"),
    _a("pte-outside-ram", "refused", "a PPGTT PTE to a gfn that is not its RAM (ENXIO)"),
    _a("pde-outside-ram", "refused", "a PPGTT PDE to a table that is not its RAM (EINVAL)"),
    _a("nonpriv-ggtt-store", "failed", "a non-privileged batch storing into host GM (the gpu stops it)"),
    _a("nonpriv-lri-fence", "failed", "a non-privileged batch loading a fence register (the gpu stops it)"),
    _a("reset-in-flight", "failed|contained", "an engine reset while its workload runs"),
    _a("pte-rewrite-in-flight", "contained", "a page-table rewrite while its workload stores through it"),
    _a("g2v-flood", "contained", f"{G2V_FLOOD} G2V PPGTT creates (quota, reclaim, a bound on PPGTTs)"),
    _a("lri-fence", "failsafe", "MI_LOAD_REGISTER_IMM of a physical fence (EBADRQC)"),
    _a("lri-gdrst", "failsafe", "MI_LOAD_REGISTER_IMM of GDRST (EBADRQC)"),
    _a("gfx-mode-bit0-lri", "failsafe", "an LRI enabling GFX_MODE bit 0 (patched, UNSUPPORTED_GUEST)"),
    _a("ggtt-store-host", "failsafe", "MI_STORE_DATA_IMM into host GM, where the shadow tables are (EFAULT)"),
    _a("ggtt-store-other", "failsafe", "MI_STORE_DATA_IMM past its own aperture (EFAULT)"),
    _a("atomic-host", "failsafe", "MI_ATOMIC on host GM (EFAULT)"),
    _a("pipe-control-host", "failsafe", "a PIPE_CONTROL post-sync write into host GM (EFAULT)"),
    _a("bb-start-outside", "failsafe", "a privileged batch start in host GM (EFAULT)"),
    _a("bb-start-second-level", "failsafe", "a second-level batch straight from the ring (EFAULT)"),
    _a("unknown-command", "failsafe", "an unknown command (EBADRQC)"),
    _a("unexpected-command", "failsafe", "MI_UPDATE_GTT (EBADRQC)"),
)
BY_KIND = {a.kind: a for a in ATTACKS}


def campaign(repeat: int) -> list[Attack]:
    """The attacks in the order tried: those the kernel keeps the vGPU running through, `repeat`
    times each, then each that sends it to failsafe once (a VM reset between them)."""
    mild = [a for a in ATTACKS if not a.failsafe]
    return mild * repeat + [a for a in ATTACKS if a.failsafe]


class HostileDriver:
    def __init__(self, core: GuestCore, repeat: int = 2, timeout_s: float = 1.0):
        self.core = core
        self.plan = campaign(repeat)
        self.timeout_ns = int(timeout_s * 1e9)
        self.next = 0
        self.wanted = 0                 # attacks drawn that wait for the running one
        self.active = False             # the campaign's task runs
        self.holding = False            # the guest's new GPU work waits (see busy)
        self.ended_in_failsafe = False
        self.reboots = 0
        self.stats: dict[str, dict] = {a.kind: {"attempts": 0, "expected": sorted(a.expect),
                                                **{o: 0 for o in OUTCOMES}, "unexpected": 0}
                                       for a in ATTACKS}
        self.reasons: list[str] = []
        self.seq = 0

    # ---- the load's view ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """An attack runs or waits for the guest's engines to go quiet: the guest's new GPU work
        holds back (what it already has in flight runs to its end first)."""
        return self.holding

    def issue(self, now: int) -> list[Any]:
        """A `hostile` operation: the campaign's next attack. One runs at a time; those drawn
        meanwhile wait their turn, so the mix's weight is the share of operations that attack."""
        if self.next + self.wanted >= len(self.plan) or self.ended_in_failsafe:
            return []
        self.wanted += 1
        if self.active:
            return []
        self.active = True
        return [self._attacks()]

    def _attacks(self) -> Iterator[Any]:
        try:
            while self.wanted and not self.ended_in_failsafe:
                if not self.core.ops_bounded() and not self.core.due():
                    break               # the run's time is up: what has not started is dropped
                self.wanted -= 1
                a = self.plan[self.next]
                self.next += 1
                self.holding = True
                try:
                    yield from self._attempt(a)
                finally:
                    self.holding = False
                # the GPU work held back for it goes before the next attack
                while self.core.gpu_held and self.wanted:
                    yield Sleep(0.002)
        finally:
            self.wanted = 0
            self.active = False

    def report(self) -> dict:
        return {"attacks": self.stats, "attempted": self.next, "planned": len(self.plan),
                "reboots": self.reboots, "ended_in_failsafe": self.ended_in_failsafe,
                "reasons": self.reasons[:16]}

    # ---- one attempt ------------------------------------------------------------------------------
    def _attempt(self, a: Attack) -> Iterator[Any]:
        while not self._quiet():
            yield Sleep(0.002)
        outcome, detail = yield from _RUN[a.kind](self, a)
        st = self.stats[a.kind]
        st["attempts"] += 1
        st[outcome] += 1
        if outcome not in a.expect:
            st["unexpected"] += 1
            self._reason(f"{a.kind}: expected {'/'.join(sorted(a.expect))}, got {outcome}"
                         f"{': ' + detail if detail else ''}")
        if outcome == "failsafe":
            if any(b.failsafe for b in self.plan[self.next:]):
                yield from self._reboot()
            else:
                self.ended_in_failsafe = True

    def _quiet(self) -> bool:
        """No GPU work of the guest's own is in flight and no ELSP is unanswered."""
        wl = self.core.wl
        return wl.inflight == 0 and all(e.submitted is None for e in wl.lay.engines.values())

    def _reason(self, r: str) -> None:
        if len(self.reasons) < 64:
            self.reasons.append(r)

    # ---- building blocks --------------------------------------------------------------------------
    def _ctx(self, a: Attack) -> i915.Context:
        return self.core.wl.lay.engines[a.engine].attack

    def _seq_off(self, a: Attack) -> tuple[i915.EngineState, int]:
        """The engine and the byte offset in its status page of the attack context's seqno."""
        lay = self.core.wl.lay
        ei = list(lay.engines).index(a.engine)
        return lay.engines[a.engine], 4 * (lrc.HWS_SEQNO_INDEX + i915.ATTACK_SEQNO + ei)

    def _seq_gm(self, a: Attack) -> int:
        e, off = self._seq_off(a)
        return e.hwsp_gm + off

    def _seq_gpa(self, a: Attack) -> int:
        e, off = self._seq_off(a)
        return (e.hwsp_gfn << PAGE_SHIFT) + off

    def _post(self, writes: list[tuple[int, int]]) -> tuple[Any, Event, dict]:
        """Posted register writes whose WRITE_DONE the attack waits for: (the Post, the event
        its WRITE_DONE sets, the box that gets its status and payload)."""
        ev, box, done = _watch("attack write")
        post = self.core.post_batch([o for o, _ in writes], [4] * len(writes), [v for _, v in writes],
                                    on_done=done)
        return post, ev, box

    def _write(self, writes: list[tuple[int, int]]) -> Iterator[Any]:
        """Posted register writes, and their WRITE_DONE waited for; returns its box."""
        post, ev, box = self._post(writes)
        yield post
        yield Wait(ev)
        return box

    def _store(self, gpa: int, data: bytes) -> Iterator[Any]:
        """A store to the guest's own RAM whose outcome it waits for (sent as a fault, so the
        hypervisor answers it on either fabric). Returns (status, WRITE_DONE payload)."""
        core = self.core
        ev, box, done = _watch("attack store")
        core.wl.expect(gpa, data)
        for p in core.ram.fault_store(gpa, data, lambda g: core.next_fault_w(g, done)):
            yield p
        yield Wait(ev)
        return box.get("status", "ok"), box.get("p", {})

    def _submit(self, a: Attack, ring: list[int], desc: lrc.Descriptor | None = None,
                extra: list[tuple[int, int]] | None = None,
                after: Callable[[], Iterator[Any]] | None = None) -> Iterator[Any]:
        """The attack context's ring gets `ring`, then a store of a new seqno to its status page
        slot and MI_USER_INTERRUPT; then the ELSP (and `extra` writes in the same batch), then
        what `after` does while the workload may be on the gpu. Returns (outcome, detail)."""
        wl = self.core.wl
        c = self._ctx(a)
        self.seq += 1
        seq = self.seq
        words = ring + cmd.store_dword(self._seq_gm(a), seq, ggtt=True) + [cmd.MI_USER_INTERRUPT.header()]
        if len(words) % 2:
            words.append(cmd.MI_NOOP.header())
        for p in wl._ring_write(c, cmd.encode(*words)):
            yield p
        for p in wl.store((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_TAIL, _I.pack(c.tail)):
            yield p
        elsp = regs.ring(a.engine, regs.RING_ELSP)
        d = desc or c.desc
        post, ev, box = self._post([(elsp, dw) for dw in lrc.elsp_dwords(d)] + (extra or []))
        yield post
        if after is not None:
            yield from after()
        yield Wait(ev)
        status, p = box["status"], box["p"]
        if status in ("refused", "failed"):
            code = (p.get("errors") or [p.get("reason") or ""])[0].split(":")[0]
            yield from self._skip(c)
            if (yield from self._in_failsafe()):
                return "failsafe", code
            return "refused", code
        ran = yield from self._wait_seqno(a, seq)
        if ran:
            return "contained", ""
        yield from self._reset(a, c)
        if (yield from self._in_failsafe()):
            return "failsafe", "accepted, then failsafe"
        return "failed", "no completion"

    def _wait_seqno(self, a: Attack, seq: int) -> Iterator[Any]:
        """Whether the attack's workload stored its seqno within the timeout: hostile_timeout_s,
        or TYPICAL_FACTOR times what the guest's own workloads take just now if that is longer
        (a loaded machine must not turn a slow completion into a failure)."""
        ram = self.core.ram
        start = self.core.now
        limit = max(self.timeout_ns, TYPICAL_FACTOR * self.core.wl.typical_ns())
        while self.core.now - start < limit:
            got = _I.unpack((yield from ram.load(self._seq_gpa(a), 4)))[0]
            if got == seq:
                return True
            yield Sleep(0.005)
        return False

    def _skip(self, c: i915.Context) -> Iterator[Any]:
        """Nothing of this submission will run: the ring goes on after it."""
        for p in self.core.wl.store((c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_HEAD, _I.pack(c.tail)):
            yield p
        c.submitted_tail = c.tail

    def _reset(self, a: Attack, c: i915.Context) -> Iterator[Any]:
        """i915's engine reset: GDRST of the engine, the ring past the lost work, the engine
        resumed."""
        wl = self.core.wl
        e = wl.lay.engines[a.engine]
        yield from self._write([(regs.GDRST, i915.ENGINE_RESET_BIT[a.engine])])
        yield from self._skip(c)
        for p in wl.resume_engine(e, self.core.now):
            yield p

    def _in_failsafe(self) -> Iterator[Any]:
        """In failsafe a masked register takes a write raw: mask bits alone read back as written."""
        yield from self._write([(PROBE_REG, 0xFFFF0000)])
        got = yield from self.core.read_reg(PROBE_REG)
        return got == 0xFFFF0000

    def _reboot(self) -> Iterator[Any]:
        """Reset the VM and boot again, as a rebooted VM's i915 would."""
        core = self.core
        state = core.state
        core.state = "rebooting"
        down = core.now
        try:
            while core.outstanding():       # (the GPU work held back for this attack waits)
                yield Sleep(0.002)
            yield Call(core.hv, "VM_RESET", None, vgpu=core.vm, timeout=60)
            self.reboots += 1
            core.after_vm_reset(core.now)
            try:
                yield from core.boot(reboot=True)
            except GvtError as err:
                core.boot_error = f"after a VM reset: {err.text}"
                core.state = state = "failed"
                raise
            core.rebooted(core.now - down)
        finally:
            core.state = state if core.state in ("booted", "rebooting") else core.state

    # ---- what an attack's GPU stores may touch ---------------------------------------------------
    def attack_page_gpa(self, k: int, off: int = 0) -> int:
        return (self.core.wl.lay.attack_gfns[k] << PAGE_SHIFT) + off

    def attack_page_va(self, k: int, off: int = 0) -> int:
        return i915.VA_ATTACK + k * PAGE_SIZE + off

    def loosen_setup(self) -> None:
        """The bytes attacks may write: the attack pages, their seqno slots, their ring heads."""
        wl = self.core.wl
        for k in range(i915.ATTACK_PAGES):
            wl.loosen(self.attack_page_gpa(k), PAGE_SIZE)
        for name, e in wl.lay.engines.items():
            if e.attack is not None:
                a = Attack("", frozenset(), "", name)
                wl.loosen(self._seq_gpa(a))
                wl.loosen((e.attack.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_HEAD)


def _watch(name: str) -> tuple[Event, dict, Callable[[str, dict], list]]:
    """An event, a box, and the on_done callback that fills the box with a WRITE_DONE's status
    and payload and sets the event."""
    ev, box = Event(name), {}

    def done(status: str, p: dict) -> list[Any]:
        box["status"], box["p"] = status, p
        return [Signal(ev)]
    return ev, box, done


# ---- the attacks ---------------------------------------------------------------------------------
def _other_gm(h: HostileDriver) -> int:
    """A GM address just past the guest's own aperture: another vGPU's, or nobody's."""
    pv = h.core.pv
    return pv["ap_base"] + pv["ap_size"] + 0x1000


def _ring_attack(build: Callable[[HostileDriver], list[int]]) -> Callable:
    def run(h: HostileDriver, a: Attack) -> Iterator[Any]:
        return (yield from h._submit(a, build(h)))
    return run


def _batch_attack(build: Callable[[HostileDriver], list[int]], privileged: bool) -> Callable:
    """The attack page 0 holds a batch; the ring starts it, from the PPGTT (non-privileged) or,
    privileged, from the GGTT."""
    def run(h: HostileDriver, a: Attack) -> Iterator[Any]:
        wl = h.core.wl
        words = build(h) + [cmd.MI_BATCH_BUFFER_END.header()]
        for p in wl.store(h.attack_page_gpa(0), cmd.encode(*words)):
            yield p
        addr = wl.lay.attack_gm[0] if privileged else h.attack_page_va(0)
        return (yield from h._submit(a, cmd.bb_start(addr, ppgtt=not privileged)))
    return run


def _ring_outside(h: HostileDriver, a: Attack) -> Iterator[Any]:
    wl = h.core.wl
    c = h._ctx(a)
    start = (c.lrc_gfns[1] << PAGE_SHIFT) + 4 * lrc.CTX_RING_START
    for p in wl.store(start, _I.pack(HOST_GM)):
        yield p
    try:
        return (yield from h._submit(a, []))
    finally:
        for p in wl.store(start, _I.pack(c.ring_gm)):
            yield p


def _lrca_outside(h: HostileDriver, a: Attack) -> Iterator[Any]:
    c = h._ctx(a)
    return (yield from h._submit(a, [], desc=lrc.descriptor(HOST_GM, c.ctx_id)))


def _elsp_before_execlists(h: HostileDriver, a: Attack) -> Iterator[Any]:
    mode = regs.ring(a.engine, regs.RING_MODE)
    yield from h._write([(mode, regs.masked_disable(regs.GFX_MODE_RUN_LIST_ENABLE))])
    try:
        return (yield from h._submit(a, []))
    finally:
        yield from h._write([(mode, regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE))])


def _pt_entry(h: HostileDriver, table_gfn: int, i: int, value: int) -> Iterator[Any]:
    return (yield from h._store((table_gfn << PAGE_SHIFT) + 8 * i, _Q.pack(value)))


def _shadowed(h: HostileDriver, a: Attack) -> Iterator[Any]:
    """A workload through the PPGTT first, so that its tables are shadowed and tracked (a
    reclaim may have dropped the shadow): a store to an untracked table is plain RAM."""
    outcome, detail = yield from h._submit(a, [])
    return None if outcome == "contained" else (outcome, f"the workload before it: {detail}")


def _pte_outside(h: HostileDriver, a: Attack) -> Iterator[Any]:
    if (before := (yield from _shadowed(h, a))) is not None:
        return before
    lay = h.core.wl.lay
    i = (i915.VA_ATTACK >> PAGE_SHIFT) + 3
    good = lrc.entry(lay.attack_gfns[3], lrc.PTE_PRESENT | lrc.PTE_RW)
    status, p = yield from _pt_entry(h, lay.pts[0], i, lrc.entry(h.core.ram_frames + 16,
                                                                 lrc.PTE_PRESENT | lrc.PTE_RW))
    yield from _pt_entry(h, lay.pts[0], i, good)           # the guest mends its table
    return _store_outcome(status, p)


def _pde_outside(h: HostileDriver, a: Attack) -> Iterator[Any]:
    if (before := (yield from _shadowed(h, a))) is not None:
        return before
    lay = h.core.wl.lay
    status, p = yield from _pt_entry(h, lay.pd, 4, lrc.entry(h.core.ram_frames + 32,
                                                             lrc.PTE_PRESENT | lrc.PTE_RW))
    yield from _pt_entry(h, lay.pd, 4, 0)
    return _store_outcome(status, p)


def _store_outcome(status: str, p: dict) -> tuple[str, str]:
    if status == "ok":
        return "contained", "the page-table store was emulated"
    return "refused", (p.get("reason") or "").split(":")[0]


def _reset_in_flight(h: HostileDriver, a: Attack) -> Iterator[Any]:
    """The ELSP and the engine's GDRST in one batch: the reset meets the workload on the gpu."""
    wl = h.core.wl
    words = [cmd.MI_NOOP.header()] * 64 + cmd.store_dword(h.attack_page_va(1, 64), 0x5E5E)
    out, detail = yield from h._submit(a, words, extra=[(regs.GDRST, i915.ENGINE_RESET_BIT[a.engine])])
    if out != "failed":                 # (a failed one was reset and resumed already)
        # the reset stopped the vGPU's scheduling: resume the engine as i915 does after a reset
        yield from h._skip(h._ctx(a))
        for p in wl.resume_engine(wl.lay.engines[a.engine], h.core.now):
            yield p
    return out, detail


def _pte_rewrite_in_flight(h: HostileDriver, a: Attack) -> Iterator[Any]:
    """The workload stores through attack page 1's PTE while the guest points that PTE at attack
    page 2 (the store to the table follows the ELSP on the same path): the workload's stores land
    in one of its own pages, never anywhere else."""
    lay = h.core.wl.lay
    i = (i915.VA_ATTACK >> PAGE_SHIFT) + 1
    flags = lrc.PTE_PRESENT | lrc.PTE_RW
    words = cmd.store_dword(h.attack_page_va(1, 128), 0x7E57) + cmd.store_dword(h.attack_page_va(1, 132), 0x7E58)

    def rewrite() -> Iterator[Any]:
        yield from _pt_entry(h, lay.pts[0], i, lrc.entry(lay.attack_gfns[2], flags))
    result = yield from h._submit(a, words, after=rewrite)
    yield from _pt_entry(h, lay.pts[0], i, lrc.entry(lay.attack_gfns[1], flags))
    return result


def _g2v_flood(h: HostileDriver, a: Attack) -> Iterator[Any]:
    """PPGTT creates for roots at the top of the guest's RAM (pages it never uses: zero tables),
    then as many destroys."""
    core = h.core
    roots = [(core.ram_frames - 1 - k) << PAGE_SHIFT for k in range(G2V_FLOOD)]
    refused = 0
    for notify in (pvinfo.G2V_PPGTT_L4_CREATE, pvinfo.G2V_PPGTT_L4_DESTROY):
        for r in roots:
            box = yield from h._write([(pvinfo.BASE + pvinfo.PDP0_LO, r & 0xFFFFFFFF),
                                       (pvinfo.BASE + pvinfo.PDP0_LO + 4, r >> 32),
                                       (pvinfo.BASE + pvinfo.G2V_NOTIFY, notify)])
            refused += box["status"] != "ok"
    # the guest's own PPGTT is announced again (a destroy of its roots is not among these)
    if (yield from h._in_failsafe()):
        return "failsafe", "after the flood"
    return "contained", f"{refused} of {2 * G2V_FLOOD} notifications refused"


_RUN: dict[str, Callable[[HostileDriver, Attack], Iterator[Any]]] = {
    "srm-unlisted": _ring_attack(lambda h: [cmd.MI_STORE_REGISTER_MEM.header(4),
                                            regs.ring("rcs", regs.RING_MI_MODE),
                                            h.attack_page_va(0) & 0xFFFFFFFF, 0]),
    "ring-outside": _ring_outside,
    "lrca-outside": _lrca_outside,
    "elsp-before-execlists": _elsp_before_execlists,
    "pte-outside-ram": _pte_outside,
    "pde-outside-ram": _pde_outside,
    "nonpriv-ggtt-store": _batch_attack(lambda h: cmd.store_dword(HOST_GM, 0x0BADC0DE, ggtt=True), False),
    "nonpriv-lri-fence": _batch_attack(lambda h: cmd.lri((regs.fence_lo(partition.HOST_FENCES), 0xBAD)), False),
    "reset-in-flight": _reset_in_flight,
    "pte-rewrite-in-flight": _pte_rewrite_in_flight,
    "g2v-flood": _g2v_flood,
    "lri-fence": _ring_attack(lambda h: cmd.lri((regs.fence_lo(partition.HOST_FENCES), 0xBAD0BAD))),
    "lri-gdrst": _ring_attack(lambda h: cmd.lri((regs.GDRST, regs.GRDOM_FULL))),
    "gfx-mode-bit0-lri": _ring_attack(lambda h: cmd.lri((regs.ring("rcs", regs.RING_MODE),
                                                         regs.masked_enable(regs.GFX_MODE_BIT0)))),
    "ggtt-store-host": _ring_attack(lambda h: cmd.store_dword(HOST_GM, 0x0BADC0DE, ggtt=True)),
    "ggtt-store-other": _ring_attack(lambda h: cmd.store_dword(_other_gm(h), 0x0BADC0DE, ggtt=True)),
    "atomic-host": _ring_attack(lambda h: cmd.atomic(HOST_GM, "inc", ggtt=True)),
    "pipe-control-host": _ring_attack(lambda h: [cmd.PIPE_CONTROL.header(cmd.LEN_PIPE_CONTROL),
                                                 cmd.PC_GLOBAL_GTT | 1 << cmd.PC_POST_SYNC_SHIFT,
                                                 HOST_GM, 0, 0xBAD, 0]),
    "bb-start-outside": _ring_attack(lambda h: cmd.bb_start(HOST_GM, ppgtt=False)),
    "bb-start-second-level": _ring_attack(lambda h: cmd.bb_start(h.core.wl.lay.attack_gm[0], ppgtt=False,
                                                                second_level=True)),
    "unknown-command": _ring_attack(lambda h: [0x1F800000, 0]),
    "unexpected-command": _ring_attack(lambda h: [cmd.BY_NAME["MI_UPDATE_GTT"].header(4), 0, 0, 0]),
}
assert set(_RUN) == set(BY_KIND)
