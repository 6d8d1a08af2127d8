"""The GVT-g mediator core: creates vGPUs and routes their trapped accesses to the rooms that
emulate them (mmio -> handlers, gtt, execlist; page_track -> ppgtt; vgpu for resets), and the
physical engines' interrupts to the workload scheduler. Sans-IO: messages and the time in,
replies and tasks out."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nodes.core import Core, Ctx
from nodes.actions import Call, Now, Post, Spawn
from nodes.errors import GvtError
from nodes.hw import bar0, gtt, lrc, partition, regs
from nodes.mediator import mmio
from nodes.mediator.aperture import GmAllocator, write_fence
from nodes.mediator.dma import HostPool
from nodes.mediator.gtt import POST_ENTRIES
from nodes.mediator.sched_policy import GVT_SCHED_VGPU_PRI_TIME_NS, POLICIES
from nodes.mediator.scheduler import HOST_HANG_TIMEOUT_NS, WorkloadScheduler
from nodes.mediator.translate import translate_entries
from nodes.mediator.vgpu import VGpu, declare_vgpu_metrics
from nodes.memory import Fabric, Layout
from nodes.mediator.ppgtt import PPGTT_RESULTS, SCRATCH_MODES, Scratch
from nodes.metrics import (TRAP_LATENCY, TRAPS, declare_sched_metrics, declare_shadow_metrics,
                           declare_trap_metrics,
                           declare_workload_metrics)
from nodes.stats import Stats
from nodes.wire.codec import Envelope
from nodes.wire.schema import pack_write_batch, unpack_write_batch

# Guest-physical space above RAM that the hypervisor refuses to pin (an MMIO hole): gfns in it
# take the "pin failed" path, gfns past it the "not guest RAM" path without a call.
GFN_HOLE_FRAMES = 4096


SCHED_EXPORT_NS = 500_000_000       # how often the scheduler's gauges are brought up to date


class MediatorCore(Core):
    role = "mediator"
    RESTORED_PEERS = frozenset({"gpu"})     # a gpu that comes back gets its state rewritten

    def __init__(self, layout: Layout, fabric: Fabric, *, aperture_size: int = 1024 << 20,
                 max_vgpus: int = partition.GVT_MAX_VGPU - 1,
                 translate: Callable[..., Any] = translate_entries,
                 hypervisor: str = "hypervisor", hypervisors: dict[int, str] | None = None,
                 gpu: str = "gpu", scratch: str = "kernel",
                 shadow_quota: int = 0, fences: int = partition.TOTAL_FENCES,
                 types: dict[str, partition.VgpuType] | None = None,
                 sched_policy: str = "timeslice", hang_timeout_ns: int | None = HOST_HANG_TIMEOUT_NS,
                 start_boost_ns: int = GVT_SCHED_VGPU_PRI_TIME_NS):
        super().__init__()
        self.layout, self.fabric = layout, fabric
        self.alloc = GmAllocator(aperture_size, fences=fences, types=types)
        self.max_vgpus = max_vgpus
        self.translate = translate
        self.hypervisor, self.gpu = hypervisor, gpu
        # several hypervisors may serve this GPU's VMs: VM -> the one that runs it (else
        # `hypervisor` runs them all)
        self.hypervisors = dict(hypervisors or {})
        if scratch not in SCRATCH_MODES:
            raise GvtError("EINVAL", f"scratch mode {scratch!r}: one of {', '.join(SCRATCH_MODES)}")
        self.scratch_mode = scratch
        self.pool = HostPool(layout.host, fabric)
        self.scratch_mfn = self.pool.scratch_mfn      # the first page of the host pool (GGTT)
        # each vGPU's share of the pool: what is left after the GGTT scratch page and every
        # vGPU's PPGTT scratch tree (4 pages), split evenly, so no vGPU can starve another
        self.shadow_quota = shadow_quota or max(1, (layout.host.frames - 1) // max_vgpus - 4)
        if self.shadow_quota * max_vgpus + 4 * max_vgpus + 1 > layout.host.frames:
            raise GvtError("EINVAL", f"{max_vgpus} vGPUs with a quota of {self.shadow_quota} pages "
                           f"each do not fit in the host pool's {layout.host.frames} pages")
        if sched_policy not in POLICIES:
            raise GvtError("EINVAL", f"scheduler policy {sched_policy!r}: one of {', '.join(POLICIES)}")
        # hang_timeout_ns 0 or None: no host hang detection (i915 with heartbeat_interval_ms 0)
        self.scheduler = WorkloadScheduler(self.pool, gpu, policy=sched_policy,
                                           hang_timeout_ns=hang_timeout_ns or None,
                                           start_boost_ns=start_boost_ns)
        self.vgpus: dict[int, VGpu] = {}
        self._resyncing: set[int] = set()     # vGPUs with a PPGTT resync queued or running
        self._sched_export_due = 0
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        declare_vgpu_metrics(self.stats)
        declare_workload_metrics(self.stats)
        declare_shadow_metrics(self.stats)
        declare_sched_metrics(self.stats)
        self.stats.counter("gvtbench_ggtt_entries_translated",
                           "Guest GGTT entries emulated, by result", ["vgpu", "result"])
        self.stats.gauge("gvtbench_pinned_pages", "Guest pages pinned for GGTT mappings", ["vgpu"])
        self.stats.counter("gvtbench_ppgtt_resyncs", "Times a vGPU's PPGTT shadows were checked "
                           "against guest memory after the hypervisor gave up messages to us",
                           ["vgpu"])
        self.stats.counter("gvtbench_gpu_restores", "Times the gpu came back (restarted, or returned "
                           "after a silence) and was reset and given its GGTT and fences again")

    # ---- device model ------------------------------------------------------------------------
    def create_vgpu(self, vgpu_id: int, vgpu_type: str) -> VGpu:
        if vgpu_id in self.vgpus:
            raise GvtError("EEXIST", f"vGPU {vgpu_id} exists already")
        if vgpu_id < 1:
            raise GvtError("EINVAL", "vGPU id 0 is the idle vGPU; ids start at 1")
        if len(self.vgpus) >= self.max_vgpus:
            raise GvtError("ENOSPC", f"the mediator is set to at most {self.max_vgpus} vGPUs "
                           f"(upstream GVT-g: {partition.GVT_MAX_VGPU - 1})")
        region = self.layout.by_name.get(f"vm{vgpu_id}")
        if region is None:
            raise GvtError("ENOENT", f"no guest RAM region for VM {vgpu_id} in the memory layout")
        part = self.alloc.allocate(vgpu_type)
        vgpu = VGpu(vgpu_id, vgpu_type, part, stats=self.stats, pool=self.pool, fabric=self.fabric,
                    gfns=region.frames + GFN_HOLE_FRAMES,
                    hypervisor=self.hypervisors.get(vgpu_id, self.hypervisor), gpu=self.gpu,
                    translate=self.translate, scheduler=self.scheduler,
                    scratch=Scratch(self.pool, vgpu_id, self.scratch_mode),
                    weight=self.alloc.type_info(vgpu_type).weight)
        self.pool.quota[vgpu_id] = self.shadow_quota
        self.vgpus[vgpu_id] = vgpu
        self.scheduler.add_vgpu(vgpu)
        return vgpu

    def setup(self, specs: list[tuple[int, str]]) -> Iterator[Any]:
        """Map the host pool into the host's GM (so shadow contexts, rings and batches have GGTT
        addresses), then create the configured vGPUs; every GGTT entry of each starts at the
        scratch page."""
        # a full GT reset first: after a restart of the mediator, the gpu may still run the
        # contexts of the one before, from host pool pages this one will use again
        yield Post(self.gpu, "MMIO_WRITE", {"off": regs.GDRST, "size": 4, "val": regs.GRDOM_FULL})
        yield from self._pool_ggtt_posts()
        for vgpu_id, vgpu_type in specs:
            vgpu = self.create_vgpu(vgpu_id, vgpu_type)
            yield from vgpu.ggtt.reset()
        yield Call(self.gpu, "SYNC")
        return [v.info() for v in self.vgpus.values()]

    # ---- peers that restart -------------------------------------------------------------------
    def peer_event(self, name: str, role: str, event: str, why: str, now: int) -> None:
        """A gpu that went silent gets nothing dispatched; one that restarted (or returned from
        a silence whose frames were given up) is reset and given its state again."""
        self.scheduler.now = now
        if name == self.gpu:
            if event == "silent":
                self.scheduler.gpu_down = f"the gpu {why}"
            else:
                self.emit(Spawn(self.restore_gpu(f"the gpu {why}")))
            return
        if role == "hypervisor" and event in ("new_stream", "silent"):
            # the hypervisor took us for dead (we were stopped past the liveness timeout: our
            # link sees that silence first, before the frames that waited, see NodeHost.run)
            # and gave up what it had sent, tracked page-table writes among them, whose stores
            # are in guest RAM now; an ELSP that waited would be emulated against that memory.
            # Each vGPU's shadows are checked against guest memory first, in its lane
            self.emit(*(Spawn(self._resync_ppgtt(v), lane=v.id) for v in self.vgpus.values()
                        if v.hypervisor == name and v.id not in self._resyncing
                        and not self._resyncing.add(v.id)))

    def _resync_ppgtt(self, vgpu: VGpu) -> Iterator[Any]:
        try:
            changed = yield from vgpu.ppgtt.resync(vgpu.mem.read)
        finally:
            self._resyncing.discard(vgpu.id)
        self.stats.inc("gvtbench_ppgtt_resyncs", (vgpu.id,))
        return changed

    def restore_gpu(self, why: str) -> Iterator[Any]:
        """Bring a gpu that restarted back to what the vGPUs expect: a full GT reset (a gpu that
        only returned still holds contexts whose frames were given up), every workload it was
        running failed with the reset as reason, then the physical GGTT (host pool and each
        vGPU's host entries) and fences rewritten from the shadows, and scheduling resumed.
        Posts to the gpu while it was down were dropped (RESTORED_PEERS): this rewrite covers
        them. Each batch reads the shadow as it is sent, so a trap emulated in between is not
        overwritten by an older value."""
        sched = self.scheduler
        sched.gpu_down = f"{why}: being restored"
        yield Post(self.gpu, "MMIO_WRITE", {"off": regs.GDRST, "size": 4, "val": regs.GRDOM_FULL})
        yield from sched.gpu_reset(why)
        yield from self._pool_ggtt_posts()
        for v in self.vgpus.values():
            yield from v.ggtt.rewrite()
            for n in range(v.part.fence_num):
                lo = regs.fence_lo(n)
                value = v.vregs.get(lo, 0) | v.vregs.get(lo + 4, 0) << 32
                for post in write_fence(v.part, n, value, self.gpu, v.id):
                    yield post
        yield Post(self.gpu, "MMIO_WRITE", {"off": regs.GFX_FLSH_CNTL, "size": 4, "val": 1})
        yield Call(self.gpu, "SYNC", timeout=30)
        sched.gpu_down = None
        sched.note_restore((yield Now()))
        self.stats.inc("gvtbench_gpu_restores")
        yield from sched.kick()

    def _pool_ggtt_posts(self) -> Iterator[Post]:
        """The host's GGTT mapping of its pool (page k at pool frame k), in batches of
        POST_ENTRIES."""
        idx, vals = self.pool.ggtt_entries()
        for a in range(0, len(idx), POST_ENTRIES):
            b = a + POST_ENTRIES
            yield Post(self.gpu, "MMIO_WRITE_BATCH", pack_write_batch(
                gtt.offset_of(idx[a:b]), np.full(len(idx[a:b]), 8), vals[a:b]))

    def _vgpu(self, vgpu_id: int) -> VGpu:
        vgpu = self.vgpus.get(vgpu_id)
        if vgpu is None:
            raise GvtError("ENODEV", f"no vGPU {vgpu_id}")
        return vgpu

    def _vgpu_of(self, msg: Envelope) -> VGpu:
        """The vGPU a hypervisor's message is for: only the hypervisor that runs its VM speaks
        for it (each VM's accesses trap in its own hypervisor)."""
        vgpu = self._vgpu(msg.vgpu)
        if msg.peer != vgpu.hypervisor and msg.peer.startswith("hypervisor"):
            raise GvtError("EPERM", f"VM {vgpu.id} runs on {vgpu.hypervisor}, not {msg.peer}")
        return vgpu

    # ---- messages ------------------------------------------------------------------------------
    LANED = frozenset({"TRAP_READ", "TRAP_WRITE", "TRACKED_WRITE", "VGPU_RESET"})

    def lane(self, msg: Envelope) -> Any:
        # a vGPU's accesses are emulated one at a time, in the order the guest made them; an
        # engine's interrupt is taken at once (a reset that holds the vGPU's lane waits for it),
        # and queues the guest-visible completion in the vGPU's lane
        if msg.kind in self.LANED:
            return msg.vgpu
        return None

    def tick(self, now: int) -> None:
        sched = self.scheduler
        sched.now = now
        due = sched.next_tick()
        if due is not None and now >= due:
            # the policy's timer: it only spawns dispatches, so its actions are emitted here
            self.emit(*sched.on_timer(now))
        hang = sched.hang_due()
        if hang is not None and now >= hang:
            self.emit(Spawn(sched.hang_check(now)))
        if now >= self._sched_export_due:
            # the shares as gauges, for a scrape between the STATS the launcher asks for
            self._sched_export_due = now + SCHED_EXPORT_NS
            self.sched_snapshot()

    def next_wake(self, now: int) -> int | None:
        sched = self.scheduler
        # (the gauges' export rides on the ticks that come anyway: it wakes nobody)
        wakes = [w for w in (sched.next_tick(), sched.hang_due()) if w is not None]
        return min(wakes) if wakes else None

    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        self.scheduler.now = now
        if kind == "TRAP_READ":
            return mmio.emulate_read(self._vgpu_of(msg), p["off"], p["size"])
        if kind == "TRAP_WRITE":
            vgpu = self._vgpu_of(msg)
            return self._trap_write(vgpu, *unpack_write_batch(p), Ctx(now, msg.trace))
        if kind == "TRACKED_WRITE":
            return self._tracked_write(self._vgpu_of(msg), p["gpa"], p["data"])
        if kind == "ENGINE_IRQ":
            return self._engine_irq(p)
        if kind == "SYNC":
            return self._sync()
        if kind == "POOL_CHECK":
            return self.pool_check()
        if kind == "PARTITIONS":
            return [v.info() for v in self.vgpus.values()]
        if kind == "VGPU_RESET":
            return self._reset(self._vgpu_of(msg))
        raise GvtError("ENOTSUP", f"the mediator does not handle {kind}")

    def _trap_write(self, vgpu: VGpu, offs: Any, sizes: Any, vals: Any, ctx: Ctx) -> Iterator[Any]:
        res = yield from mmio.emulate_writes(vgpu, offs, sizes, vals, ctx)
        if res["gtt"]:
            self._export_ggtt(vgpu)
        return res

    def _tracked_write(self, vgpu: VGpu, gpa: int, data: bytes) -> Iterator[Any]:
        yield from vgpu.track.on_write(gpa, data, failsafe=vgpu.failsafe is not None)
        self._export_workloads({vgpu.id})

    def _engine_irq(self, p: dict) -> Iterator[Any]:
        if p["engine"] not in self.scheduler.inflight:
            raise GvtError("EINVAL", f"ENGINE_IRQ from unknown engine {p['engine']!r}")
        yield from self.scheduler.on_engine_irq(p["engine"], p["csb"], p["faults"])

    def _export_workloads(self, which: set[int] | None = None) -> None:
        for v in self.vgpus.values():
            if which is not None and v.id not in which:
                continue
            self.stats.set("gvtbench_shadow_pages", (v.id,), v.ppgtt.shadow_pages())
            self.stats.set("gvtbench_ppgtt_tracked_writes", (v.id,), v.ppgtt.counts["tracked_writes"])
            for result in PPGTT_RESULTS:
                self.stats.set("gvtbench_ppgtt_entries_translated", (v.id, result),
                               v.ppgtt.counts[result])
            self.stats.set("gvtbench_context_switches", (v.id,),
                           sum(el.context_switches for el in v.execlists.values()))
            self.stats.set("gvtbench_virtual_irqs", (v.id,), v.msi_injected)
            self.stats.set("gvtbench_ppgtt_reclaimed", (v.id,), v.ppgtt.counts["reclaimed"])
            self.stats.set("gvtbench_cmd_scanned", (v.id,), v.commands_scanned)
            self.stats.set("gvtbench_pool_pages", (v.id, "used"), self.pool.used.get(v.id, 0))
            self.stats.set("gvtbench_pool_pages", (v.id, "quota"), self.pool.quota.get(v.id, 0))

    def pool_check(self) -> dict:
        """The host pool holds only mediator data, table by table: every page not in use is zero;
        each vGPU's scratch tables hold their scratch entries only; every present entry of every
        shadow table of every level points where it may: an upper level at a shadow table of the
        same vGPU or its scratch, a 2 MiB entry at the VM's own RAM, a leaf at the VM's own RAM or
        its scratch page. What GPU accesses left in a vGPU's scratch page is counted, not a
        violation (the kernel's scratch absorbs them)."""
        pool = self.pool
        region = pool.region
        violations: list[str] = []
        n_viol = 0

        def bad(text: str) -> None:
            nonlocal n_viol
            n_viol += 1
            if len(violations) < 8:
                violations.append(text)
        scratch_tables = {m for v in self.vgpus.values() for m in v.scratch.page[:3]}
        scratch_data = {self.scratch_mfn: "the GGTT scratch page"}
        scratch_data.update({v.scratch.page[3]: f"vGPU {v.id}'s scratch page" for v in self.vgpus.values()})
        dirty: dict[str, int] = {}
        for k in range(region.frames):
            mfn = region.base_mfn + k
            if mfn in scratch_tables:
                continue                # checked below against what it must hold
            what = scratch_data.get(mfn)
            if what is None and not pool.is_free(mfn):
                continue
            nz = int(np.count_nonzero(np.frombuffer(pool.page(mfn), dtype=np.uint8)))
            if nz and what is not None:
                dirty[what] = nz
            elif nz:
                bad(f"host pool page {mfn:#x} is free but not zero")
        for v in self.vgpus.values():
            vm = self.layout.vm_region(v.id)
            for level in range(3):
                if bytes(pool.page(v.scratch.page[level])) != v.scratch.expected(level):
                    bad(f"vGPU {v.id}: its {lrc.LEVEL_NAMES[level]}-level scratch table was written")
            tables = list(v.ppgtt.tables.values())
            tables += [c for t in tables for c in t.children.values() if c.split and c.mfn]
            own = {t.mfn for t in tables}
            for t in tables:
                ents = np.frombuffer(bytes(pool.page(t.mfn)), dtype="<u8")
                pres = gtt.present(ents)
                frames = gtt.frame_of(ents).astype(np.int64)
                if t.level == 3:
                    ok = ((frames >= vm.base_mfn) & (frames < vm.end_mfn)) | (frames == v.scratch.page[3])
                    wrong = np.flatnonzero(pres & ~ok)
                    if len(wrong):
                        bad(f"vGPU {v.id}: shadow PT for gfn {t.gfn:#x} entry {int(wrong[0])} maps "
                            f"machine frame {int(frames[wrong[0]]):#x} outside VM {v.id}'s RAM")
                    continue
                for i in np.flatnonzero(pres).tolist():
                    e, f = int(ents[i]), int(frames[i])
                    if t.level == 2 and e & lrc.PDE_PS_2M:
                        if not (vm.base_mfn <= f and f + lrc.ENTRIES_PER_TABLE <= vm.end_mfn):
                            bad(f"vGPU {v.id}: shadow PD for gfn {t.gfn:#x} entry {i} maps a 2 MiB page "
                                f"at machine frame {f:#x} outside VM {v.id}'s RAM")
                        continue
                    if f in own or f == v.scratch.page[t.level]:
                        continue
                    bad(f"vGPU {v.id}: shadow {lrc.LEVEL_NAMES[t.level]} for gfn {t.gfn:#x} entry {i} "
                        f"points at machine frame {f:#x}, no table of its own")
        return {"pages_checked": region.frames, "violations": n_viol, "reasons": violations,
                "in_use": pool.in_use(), "scratch_dirty": dirty}

    def _sync(self) -> Iterator[Any]:
        # a request on the gpu link is answered after every posted write before it
        return (yield Call(self.gpu, "SYNC"))

    def _reset(self, vgpu: VGpu) -> Iterator[Any]:
        yield from vgpu.reset_device()
        yield Call(self.gpu, "SYNC")
        self._export_ggtt(vgpu)
        return vgpu.info()

    OBSERVED = frozenset({"TRAP_READ", "TRAP_WRITE"})

    def observe(self, msg: Envelope, result: Any, elapsed_ns: int) -> None:
        """The shell measured how long a request took to emulate: the mediator stage."""
        if msg.kind == "TRAP_READ":
            kind = bar0.trap_kind(bar0.decode(msg.payload["off"], msg.payload["size"]), False)
            self._record(msg.vgpu, kind, elapsed_ns, 1)
        elif msg.kind == "TRAP_WRITE":
            for kind, n in (("mmio_write", result["mmio"]), ("gtt_write", result["gtt"])):
                if n:
                    self._record(msg.vgpu, kind, elapsed_ns, n)

    def _record(self, vgpu: int, kind: str, elapsed_ns: int, n: int) -> None:
        lab = (vgpu, kind, "mediator")
        self.stats.hist(TRAP_LATENCY, lab).record(elapsed_ns, n)
        self.stats.inc(TRAPS, lab, n)

    def _export_ggtt(self, vgpu: VGpu) -> None:
        for result, count in vgpu.ggtt.counts.items():
            self.stats.set("gvtbench_ggtt_entries_translated", (vgpu.id, result), count)
        self.stats.set("gvtbench_pinned_pages", (vgpu.id,), vgpu.pins.count())

    def snapshot(self) -> dict:
        self._export_workloads()
        return {"vgpus": {v.id: {**v.info(), "ggtt": dict(v.ggtt.counts), "pinned": v.pins.count(),
                                 "pin_calls": v.pins.pin_calls, "workloads": dict(v.workloads),
                                 "fail_reasons": dict(v.fail_reasons),
                                 "execlist_errors": v.execlist_errors,
                                 "refusals": dict(v.refusals), "commands_scanned": v.commands_scanned,
                                 "scans": v.scans, "scan_ns": v.scan_ns,
                                 "scheduled": v.sched_active,
                                 "pool_pages": self.pool.used.get(v.id, 0),
                                 "ppgtt": {**v.ppgtt.counts, "shadow_pages": v.ppgtt.shadow_pages()},
                                 "context_switches": sum(el.context_switches for el in v.execlists.values()),
                                 "csb_entries": sum(el.csb_entries for el in v.execlists.values()),
                                 "virtual_irqs": v.msi_injected}
                          for v in self.vgpus.values()},
                "pool_pages_in_use": self.pool.in_use(), "scratch": self.scratch_mode,
                "gpu_resets": self.scheduler.gpu_resets,
                "gpu_restores": list(self.scheduler.restores),
                "shadow_quota": self.shadow_quota,
                "sched": self.sched_snapshot()}

    def sched_snapshot(self) -> dict:
        """The scheduler as the result shows it: the policy, each vGPU's GPU share against its
        weight share, switches and what they cost."""
        sched = self.scheduler
        shares = sched.policy.shares()
        st = self.stats
        for vid, sh in shares.items():
            st.set("gvtbench_gpu_owner_seconds", (vid,), sh["gpu_ns"] / 1e9)
            st.set("gvtbench_gpu_share", (vid,), sh["gpu_share"])
            st.set("gvtbench_weight_share", (vid,), sh["weight_share"])
            st.set("gvtbench_timeslice_left_seconds", (vid,), sh["left_ns"] / 1e9)
        st.set("gvtbench_vgpu_switches", (), sched.switches)
        return {"policy": sched.policy.name, "switches": sched.switches,
                "host_resets": sched.host_resets,
                "mmio_switches": sched.mmio.switches, "mmio_switch_ns": sched.mmio.save_ns,
                "mmio_save_failures": sched.mmio.save_failures,
                "shares": shares,
                "engine_ns": {v.id: dict(v.engine_ns) for v in self.vgpus.values()}}
