"""Guest core (sans-IO): the i915 driver model's boot sequence, its GGTT mappings, and the load.

Every access goes to BAR0 through the hypervisor. Reads are requests; writes are posted: they
carry the guest's own write number `w`, and the hypervisor answers WRITE_DONE(upto=w) once the
mediator has emulated them. Latency is measured from the intended issue time (open loop), so a
slow system cannot hide its queueing.
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from nodes import hw
from nodes.errors import GvtError, need
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.runtime import Call, Post, Sleep
from nodes.stats import Stats
from nodes.wire.codec import Envelope, RemoteError

MIXES = ("mmio-read", "mmio-write", "gtt-burst")
N_GPRS = 16
TOKEN = struct.Struct("<IIQ")       # vm, GGTT index, nonce: 16 bytes written by the gpu probe


@dataclass
class LoadSpec:
    mix: dict[str, float] = field(default_factory=lambda: {"mmio-read": 0.4, "mmio-write": 0.4,
                                                           "gtt-burst": 0.2})
    mode: str = "open"              # open | closed
    rate: float = 2000.0            # ops/s per vGPU (open loop)
    concurrency: int = 8            # outstanding ops (closed loop)
    window: int = 256               # the most ops in flight in open loop before issue waits
    burst: int = 256                # GGTT entries per gtt-burst
    invalid_gfn_ratio: float = 0.002   # present entries with a gfn that is not RAM
    not_present_ratio: float = 0.01
    outside_ratio: float = 0.05     # bursts that also poke entries outside the partition
    duration_s: float = 10.0
    ops: int = 0                    # > 0: stop after this many ops instead of the duration


class GuestCore:
    role = "guest"

    def __init__(self, vm: int, ram_frames: int, seed: int, load: LoadSpec, *,
                 clock: Callable[[], int], hypervisor: str = "hypervisor", launcher: str = "launcher",
                 gvt_aware: bool = True):
        self.vm, self.ram_frames, self.load = vm, ram_frames, load
        self.clock = clock
        self.hv, self.launcher = hypervisor, launcher
        self.gvt_aware = gvt_aware
        self.rng = np.random.default_rng([seed, vm, 0x6E57])
        self.state = "idle"
        self.pv: dict[str, int] = {}
        self.ranges: list[tuple[int, int]] = []     # (first GGTT index, count): aperture, hidden
        self.map: np.ndarray | None = None          # what this guest last wrote to each of its entries
        self.gpr = [0] * N_GPRS
        self.wno = 0                                # posted writes issued
        self.inflight_writes: deque[tuple[int, int, str, int]] = deque()   # (w, intended, kind, n)
        self.reads_inflight = 0
        self.issued = self.completed = self.failed = 0
        self.mismatches = 0
        self.fail_reasons: dict[str, int] = {}
        self.irqs = 0
        self.t0 = 0
        self.next_op = 0            # index of the next op in the open-loop schedule
        self.end_ns = 0
        self.boot_error: str | None = None
        self._mix_names = [m for m in self.load.mix if self.load.mix[m] > 0]
        self._draw_mix: list[int] = []
        self._draw_gpr: list[int] = []
        self._draw_val: list[int] = []
        self._draw_i = 0
        self._plan: tuple[int, list] | None = None
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        self.stats.counter("gvtbench_guest_ops", "Load operations by mix and status", ["vgpu", "mix", "status"])
        self.stats.counter("gvtbench_guest_irqs", "Interrupts delivered to the guest", ["vgpu"])

    # ---- BAR0 access helpers (task fragments) ----------------------------------------------------
    def _read(self, off: int, size: int = 4) -> Iterator[Any]:
        return (yield Call(self.hv, "MMIO_READ", {"off": off, "size": size}, vgpu=self.vm))

    def _post_write(self, off: int, val: int, size: int = 4) -> Post:
        self.wno += 1
        return Post(self.hv, "MMIO_WRITE", {"off": off, "size": size, "val": val, "w": self.wno},
                    vgpu=self.vm)

    def _first_read(self, off: int, size: int, patience_s: float = 30.0) -> Iterator[Any]:
        """The first access waits for the vGPU to exist: nodes started by hand, one per host,
        come up in any order, and the mediator answers ENODEV until it has created the vGPU."""
        deadline = self.clock() + int(patience_s * 1e9)
        while True:
            try:
                return (yield from self._read(off, size))
            except RemoteError as err:
                if err.code not in ("ENODEV", "ETIMEDOUT") or self.clock() > deadline:
                    raise
            yield Sleep(0.1)

    # ---- boot ------------------------------------------------------------------------------
    def boot(self) -> Iterator[Any]:
        """i915 on GVT-g: detect the PV page, balloon, then enable execlists."""
        self.state = "booting"
        if self.gvt_aware:
            magic = yield from self._first_read(hw.PVINFO_BASE + hw.PV_MAGIC_OFF, 8)
            if magic != hw.PV_MAGIC:
                raise GvtError("ENODEV", f"PV info magic is {magic:#x}, not vGTvGTvG: not a GVT-g vGPU")
            ver = yield from self._read(hw.PVINFO_BASE + hw.PV_VERSION_MAJOR_OFF, 4)
            major, minor = ver & 0xFFFF, ver >> 16
            if major != hw.PV_VERSION_MAJOR:
                raise GvtError("EPROTO", f"PV interface version {major}.{minor} is not supported")
            pv = {}
            for name, off in (("vgt_id", hw.PV_VGT_ID_OFF), ("caps", hw.PV_CAPS_OFF),
                              ("ap_base", hw.PV_AVAIL_MAPPABLE_BASE), ("ap_size", hw.PV_AVAIL_MAPPABLE_SIZE),
                              ("hi_base", hw.PV_AVAIL_NONMAPPABLE_BASE),
                              ("hi_size", hw.PV_AVAIL_NONMAPPABLE_SIZE), ("fences", hw.PV_AVAIL_FENCE_NUM)):
                pv[name] = yield from self._read(hw.PVINFO_BASE + off, 4)
            pv["version"] = major
            self.pv = pv
            # balloon: everything outside avail_rs is reserved and never used by this guest
            self.ranges = [(pv["ap_base"] >> hw.PAGE_SHIFT, pv["ap_size"] >> hw.PAGE_SHIFT),
                           (pv["hi_base"] >> hw.PAGE_SHIFT, pv["hi_size"] >> hw.PAGE_SHIFT)]
            self.map = np.zeros(sum(n for _, n in self.ranges), dtype=np.uint64)
        gfx_mode = hw.RCS_BASE + hw.RING_GFX_MODE
        yield self._post_write(gfx_mode, hw.masked_enable(hw.GFX_MODE_RUN_LIST_ENABLE))
        self.inflight_writes.append((self.wno, self.clock(), "boot", 1))
        mode = yield from self._read(gfx_mode, 4)
        if not mode & hw.GFX_MODE_RUN_LIST_ENABLE:
            raise GvtError("EIO", f"execlists did not turn on: GFX_MODE reads {mode:#x}")
        self.state = "booted"
        return dict(self.pv)

    # ---- load ------------------------------------------------------------------------------
    def start(self, now: int) -> None:
        if self.map is None:
            raise GvtError("EAGAIN", "the guest has not booted (or is not GVT-g aware): no GM to use")
        self.state = "running"
        self.t0 = now
        self.next_op = 0
        self.end_ns = now + int(self.load.duration_s * 1e9)

    def _due(self, now: int) -> bool:
        if self.load.ops and self.issued >= self.load.ops:
            return False
        if not self.load.ops and now >= self.end_ns:
            return False
        return True

    def _inflight(self) -> int:
        return self.reads_inflight + len(self.inflight_writes)

    def tick(self, now: int) -> list[Any]:
        if self.state != "running":
            return []
        out: list[Any] = []
        ld = self.load
        if ld.mode == "open":
            period = 1e9 / ld.rate
            while self._due(now) and self._inflight() < ld.window:
                intended = self.t0 + int(self.next_op * period)
                if intended > now:
                    break
                self.next_op += 1
                out.append(self._issue(intended))
        else:
            while self._due(now) and self._inflight() < ld.concurrency:
                out.append(self._issue(now))
        if not self._due(now) and self._inflight() == 0:
            self.state = "drained"
            out.append(Post(self.launcher, "REPORT", self.report(), vgpu=self.vm))
        return out

    def next_wake(self, now: int) -> int | None:
        if self.state != "running" or self.load.mode != "open":
            return None
        return self.t0 + int(self.next_op * 1e9 / self.load.rate)

    def _draw(self) -> tuple[str, int, int]:
        """The next op's mix, GPR and value. Drawn in blocks: numpy per call costs more than a
        whole trap's worth of Python, and the generator must not slow the system it measures."""
        if self._draw_i >= len(self._draw_mix):
            n = 4096
            cum = np.cumsum([self.load.mix[m] for m in self._mix_names], dtype=float)
            self._draw_mix = np.searchsorted(cum / cum[-1], self.rng.random(n), side="right").tolist()
            self._draw_gpr = self.rng.integers(0, N_GPRS, n).tolist()
            self._draw_val = self.rng.integers(0, 1 << 32, n, dtype=np.int64).tolist()
            self._draw_i = 0
        i = self._draw_i
        self._draw_i += 1
        return self._mix_names[min(self._draw_mix[i], len(self._mix_names) - 1)], self._draw_gpr[i], self._draw_val[i]

    def _issue(self, intended: int) -> Any:
        mix, k, val = self._draw()
        self.issued += 1
        if mix == "mmio-read":
            self.reads_inflight += 1
            # what the read must return is fixed now, in issue order, not when the task first runs
            return self._op_read(intended, k, self.gpr[k])
        if mix == "mmio-write":
            self.gpr[k] = val
            post = self._post_write(hw.RCS_GPR0 + 4 * k, val)
            self.inflight_writes.append((self.wno, intended, "mmio_write", 1))
            return post
        return self._gtt_burst(intended)

    def _op_read(self, intended: int, k: int, expect: int) -> Iterator[Any]:
        try:
            val = yield from self._read(hw.RCS_GPR0 + 4 * k, 4)
        except Exception as err:
            self._fail("mmio-read", str(err))
            return
        finally:
            self.reads_inflight -= 1
        self._complete("mmio_read", "mmio-read", intended, 1)
        if val != expect:
            # posted writes are ordered before a later read: a stale value is a mediator bug
            self.mismatches += 1
            self._fail_reason(f"GPR{k} read {val:#x}, last written {expect:#x}")

    def _gtt_burst(self, intended: int) -> Post:
        ld, rng = self.load, self.rng
        r = 0 if rng.random() < 0.5 else 1
        first, count = self.ranges[r]
        n = min(ld.burst, count)
        start = int(rng.integers(count - n + 1))
        idx = np.arange(first + start, first + start + n, dtype=np.int64)
        gfns = rng.integers(0, self.ram_frames, n, dtype=np.int64)
        bad = rng.random(n) < ld.invalid_gfn_ratio
        gfns[bad] = self.ram_frames + rng.integers(0, 1 << 20, int(bad.sum()))
        vals = (gfns.astype(np.uint64) << np.uint64(hw.PAGE_SHIFT)) | np.uint64(hw.PTE_PRESENT | hw.PTE_RW)
        absent = rng.random(n) < ld.not_present_ratio
        vals[absent] &= ~np.uint64(hw.PTE_PRESENT)
        local = start + (0 if r == 0 else self.ranges[0][1])
        self.map[local:local + n] = vals
        if rng.random() < ld.outside_ratio:
            # probe the ballooned space: these writes must be dropped by the mediator
            probe = self._outside_indices(4)
            idx = np.concatenate([idx, probe])
            vals = np.concatenate([vals, np.full(len(probe), hw.pte_encode(1), dtype=np.uint64)])
        self.wno += 1
        self.inflight_writes.append((self.wno, intended, "gtt_write", len(idx)))
        offs = (idx * 8 + hw.GTT_OFFSET).astype("<u4")
        return Post(self.hv, "MMIO_WRITE_BATCH",
                    {"off": offs.tobytes(), "size": bytes([8]) * len(idx),
                     "val": vals.astype("<u8").tobytes(), "w": self.wno}, vgpu=self.vm)

    def _outside_indices(self, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            i = int(self.rng.integers(hw.GGTT_ENTRIES))
            if not any(f <= i < f + c for f, c in self.ranges):
                out.append(i)
        return np.array(out, dtype=np.int64)

    def _complete(self, kind: str, mix: str, intended: int, n: int) -> None:
        lat = self.clock() - intended
        lab = (self.vm, kind, "guest")
        self.stats.hist(TRAP_LATENCY, lab).record(lat, n)
        self.stats.inc(TRAPS, lab, n)
        self.stats.inc("gvtbench_guest_ops", (self.vm, mix, "completed"))
        self.completed += 1

    def _fail(self, mix: str, reason: str) -> None:
        self.failed += 1
        self.stats.inc("gvtbench_guest_ops", (self.vm, mix, "failed"))
        self._fail_reason(reason)

    def _fail_reason(self, reason: str) -> None:
        if len(self.fail_reasons) < 32 or reason in self.fail_reasons:
            self.fail_reasons[reason] = self.fail_reasons.get(reason, 0) + 1

    # ---- messages ----------------------------------------------------------------------------
    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        if kind == "WRITE_DONE":
            upto = need(p, "upto", int)
            failed = p.get("failed")
            q = self.inflight_writes
            while q and q[0][0] <= upto:
                _w, intended, tkind, n = q.popleft()
                if tkind == "boot":         # part of boot, not of the load
                    continue
                mix = "gtt-burst" if tkind == "gtt_write" else "mmio-write"
                if failed:
                    self._fail(mix, f"posted write failed: {failed}")
                else:
                    self._complete(tkind, mix, intended, n)
            if p.get("n_errors"):
                for e in p.get("errors", [])[:4]:
                    self._fail_reason(f"mediator refused a write: {e}")
            return None
        if kind == "IRQ":
            self.irqs += 1
            self.stats.inc("gvtbench_guest_irqs", (self.vm,))
            return None
        if kind == "START":
            return self.boot_and_start(p)
        if kind == "VERIFY_PLAN":
            return self.verify_plan(need(p, "nonce", int))
        if kind == "VERIFY":
            return self.verify(need(p, "nonce", int))
        if kind == "REPORT":
            return self.report()
        raise GvtError("ENOTSUP", f"the guest does not handle {kind}")

    def boot_and_start(self, p: Any) -> Iterator[Any]:
        try:
            pv = yield from self.boot()
        except GvtError as err:
            self.boot_error = err.text
            self.state = "failed"
            raise
        except Exception as err:
            self.boot_error = str(err)
            self.state = "failed"
            raise GvtError(getattr(err, "code", "EIO"), f"boot failed: {err}") from None
        if isinstance(p, dict) and p.get("load", True):
            self.start(self.clock())
        return pv

    # ---- verdict -----------------------------------------------------------------------------
    def mapped_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Global GGTT index and value of every entry this guest wrote (last value)."""
        if self.map is None:
            return np.zeros(0, np.int64), np.zeros(0, np.uint64)
        (a0, an), (h0, hn) = self.ranges
        glob = np.concatenate([np.arange(a0, a0 + an), np.arange(h0, h0 + hn)])
        written = self.map != 0
        return glob[written], self.map[written]

    def _probe_plan(self, nonce: int) -> list[tuple[int, int, int, bytes]]:
        """(gm, gfn, offset in page, token) for each present entry with a RAM gfn; entries that
        share a gfn get different 16-byte slots of the page."""
        idx, vals = self.mapped_entries()
        present = (vals & np.uint64(hw.PTE_PRESENT)) != 0
        gfns = ((vals & np.uint64(hw.PTE_ADDR_MASK)) >> np.uint64(hw.PAGE_SHIFT)).astype(np.int64)
        use = present & (gfns < self.ram_frames)
        slots: dict[int, int] = {}
        plan = []
        for i, g in zip(idx[use].tolist(), gfns[use].tolist()):
            k = slots.get(g, 0)
            if k >= hw.PAGE_SIZE // TOKEN.size:
                continue
            slots[g] = k + 1
            plan.append((i * hw.PAGE_SIZE + 16 * k, g, 16 * k, TOKEN.pack(self.vm, i, nonce)))
        return plan

    def verify_plan(self, nonce: int) -> dict:
        idx, vals = self.mapped_entries()
        plan = self._probe_plan(nonce)
        self._plan = (nonce, plan)      # VERIFY of the same nonce checks exactly these probes
        return {"entries_idx": idx.astype("<u8").tobytes(), "entries_val": vals.astype("<u8").tobytes(),
                "probes": [[gm, tok] for gm, _g, _o, tok in plan], "ram_frames": self.ram_frames}

    def verify(self, nonce: int) -> Iterator[Any]:
        """After the gpu wrote each probe token through GM, read them back from guest RAM."""
        plan = self._plan[1] if self._plan and self._plan[0] == nonce else self._probe_plan(nonce)
        ops = [[g * hw.PAGE_SIZE + o, TOKEN.size] for _gm, g, o, _t in plan]
        got: list[bytes] = []
        for i in range(0, len(ops), 16384):
            got += yield Call(self.hv, "GPA_READ", {"ops": ops[i:i + 16384]}, vgpu=self.vm)
        bad = [(gm, tok, data) for (gm, _g, _o, tok), data in zip(plan, got) if data != tok]
        return {"probes": len(plan), "landed": len(plan) - len(bad),
                "misses": [f"GM {gm:#x}: expected {tok.hex()}, guest RAM has {data.hex()}"
                           for gm, tok, data in bad[:8]]}

    def report(self) -> dict:
        return {"vm": self.vm, "state": self.state, "issued": self.issued, "completed": self.completed,
                "failed": self.failed, "pending": self._inflight(), "mismatches": self.mismatches,
                "fail_reasons": dict(self.fail_reasons), "irqs": self.irqs, "boot_error": self.boot_error,
                "pv": self.pv, "elapsed_s": (self.clock() - self.t0) / 1e9 if self.t0 else 0.0}

    def progress(self) -> dict:
        return {"vm": self.vm, "issued": self.issued, "completed": self.completed, "failed": self.failed,
                "state": self.state}
