"""A vGPU (gvt/vgpu.c): its partition, virtual registers, GGTT and PPGTT shadows and pins, page
tracking, execlists and workload queues, failsafe state, and its resets
(intel_gvt_reset_vgpu_locked)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

from nodes.hw import regs
from nodes.mediator import execlist, handlers
from nodes.mediator.aperture import Partition, write_fence
from nodes.mediator.dma import GuestMemory, HostPool
from nodes.mediator.gtt import GgttShadow
from nodes.mediator.page_track import PageTrack
from nodes.mediator.pins import GfnPins
from nodes.mediator.ppgtt import Ppgtt, Scratch
from nodes.memory import Fabric
from nodes.metrics import CMD_SCAN_SECONDS
from nodes.stats import Stats

VGPU_STATE = "gvtbench_vgpu_state"
VGPU_STATES = ("active", "failsafe")
CMD_REFUSED = "gvtbench_cmd_refused"
ENGINE_RESET = "engine reset (GDRST)"
GT_RESET = "GT reset (GDRST)"
DEVICE_RESET = "device reset"


def declare_vgpu_metrics(stats: Stats) -> None:
    stats.gauge(VGPU_STATE, "1 for the state a vGPU is in, 0 for the others (failsafe: its "
                "registers and GGTT are no longer emulated)", ["vgpu", "state"])
    stats.counter("gvtbench_vgpu_failsafe_entered", "Times a vGPU entered failsafe, by reason",
                  ["vgpu", "reason"])
    stats.counter("gvtbench_vgpu_resets", "vGPU resets, by kind (engine, gt, device)",
                  ["vgpu", "kind"])
    stats.counter(CMD_REFUSED, "Workloads the mediator refused while creating or shadowing them, "
                  "by errno (EBADRQC and EFAULT send the vGPU to failsafe)", ["vgpu", "code"])
    stats.counter("gvtbench_cmd_scanned", "Commands the command parser scanned", ["vgpu"])
    stats.histogram(CMD_SCAN_SECONDS, "Time the command parser took per workload (its ring "
                    "segment and privileged batches, their reads of guest memory included)", ["vgpu"])


class VGpu:
    FAILSAFE_GUEST_ERR = handlers.FAILSAFE_GUEST_ERR

    def __init__(self, vgpu_id: int, vgpu_type: str, part: Partition, *, stats: Stats,
                 pool: HostPool, fabric: Fabric, gfns: int, hypervisor: str, gpu: str,
                 translate: Callable[..., Any], scheduler: Any, scratch: Scratch, weight: int):
        self.id, self.type, self.part = vgpu_id, vgpu_type, part
        self.weight = weight
        self.stats = stats
        self.hypervisor, self.gpu = hypervisor, gpu
        self.vregs: dict[int, int] = {}         # dword offset -> value
        self.pv_notified = False                # set by any read of the PV info page
        self.failsafe: str | None = None        # the reason, while in failsafe
        self.failsafe_pending = False           # entered failsafe; its queued work not failed yet
        self.g2v_notifications: list[int] = []
        self.pins = GfnPins(vgpu_id, gfns, hypervisor)
        self.ggtt = GgttShadow(vgpu_id, part, self.pins, pool.scratch_mfn, gpu, translate)
        self.track = PageTrack(vgpu_id, hypervisor)
        self.mem = GuestMemory(self, fabric)
        self.scratch = scratch
        self.ppgtt = Ppgtt(vgpu_id, pool, fabric, self.pins, self.track, translate, scratch,
                           ips_enabled=lambda: handlers.ips_enabled(self))
        self.scheduler = scheduler
        self.execlists: dict[str, execlist.Execlist] = {}
        self.queues: dict[str, list] = {e: [] for e in regs.ENGINES}
        self.running = 0                        # workloads on the gpu (sent, not reported)
        self.execlist_errors = 0                # schedule-outs of a context not running
        self.idle_waiters: list = []            # Events set when `running` drops to 0
        self.sched_active = False               # scheduled: the guest enabled execlists
        self.engine_ns: dict[str, int] = {}     # engine time of its workloads, by engine
        self.hws_pga: dict[str, int] = {}       # engine -> GGTT address of its status page
        self.workloads = {"submitted": 0, "completed": 0, "failed": 0}
        self.fail_reasons: dict[str, int] = {}
        self.refusals: dict[str, int] = {}      # errno -> workloads refused by creation/shadowing
        self.commands_scanned = 0
        self.scans = 0                          # workloads scanned whole, and their time
        self.scan_ns = 0
        self.irq_events = 0
        self.msi_injected = 0
        for e in regs.ENGINES:
            execlist.reset_engine(self, e)
        handlers.reset_mmio(self, dmlr=True)
        handlers.populate_pvinfo(self)
        self._export_state()

    def _export_state(self) -> None:
        state = "active" if self.failsafe is None else "failsafe"
        for s in VGPU_STATES:
            self.stats.set(VGPU_STATE, (self.id, s), int(s == state))

    def enter_failsafe(self, reason: str) -> None:
        """Stop emulating this vGPU's registers and GGTT; only its virtual copies change from now
        on (mmio.c failsafe_emulate_mmio_rw). The first reason is kept; its queued work fails at
        the scheduler's next turn (failsafe_pending)."""
        if self.failsafe is None:
            self.failsafe = reason
            self.failsafe_pending = True
            self._export_state()
            self.stats.inc("gvtbench_vgpu_failsafe_entered", (self.id, reason))

    def count_refusal(self, code: str) -> None:
        self.refusals[code] = self.refusals.get(code, 0) + 1
        self.stats.inc(CMD_REFUSED, (self.id, code))

    def start_schedule(self) -> Iterator[Any]:
        """The guest enabled execlists on an engine (intel_vgpu_start_schedule)."""
        yield from self.scheduler.start(self)

    def reset_engines(self, engines: frozenset[str]) -> Iterator[Any]:
        """A guest's GDRST (not a device-model reset). Engine bits: those engines' execlists and
        work. Bit 0 (GRDOM_FULL, every engine): also execlists off and the registers below
        0x44200 and the PV info page back to their reset values, and every PPGTT shadow and its
        page tracking dropped (intel_vgpu_invalidate_ppgtt). The GGTT, fences, failsafe and
        pv_notified stay."""
        full = engines == frozenset(regs.ENGINES)
        yield from self.scheduler.reset(self, sorted(engines), GT_RESET if full else ENGINE_RESET)
        if full:
            yield from self.ppgtt.invalidate_all()
            handlers.reset_mmio(self, dmlr=False)
            handlers.populate_pvinfo(self)
        self.stats.inc("gvtbench_vgpu_resets", (self.id, "gt" if full else "engine"))

    def reset_device(self) -> Iterator[Any]:
        """A device-model reset (intel_gvt_reset_vgpu): every engine, the PPGTTs and their page
        tracking, the GGTT's host entries, the fences, all registers, the PV page; failsafe and
        pv_notified are cleared."""
        yield from self.scheduler.reset(self, list(regs.ENGINES), DEVICE_RESET)
        self.hws_pga.clear()
        yield from self.ppgtt.destroy_all()
        yield from self.track.drop_all()
        yield from self.ggtt.reset()
        for i in range(self.part.fence_num):
            yield from write_fence(self.part, i, 0, self.gpu, self.id)
        handlers.reset_mmio(self, dmlr=True)
        handlers.populate_pvinfo(self)
        self.failsafe = None
        self.failsafe_pending = False
        self._export_state()
        self.pv_notified = False
        self.stats.inc("gvtbench_vgpu_resets", (self.id, "device"))

    def info(self) -> dict:
        return {"id": self.id, "type": self.type, "weight": self.weight, "failsafe": self.failsafe,
                "partition": self.part.to_wire(), "pv_notified": self.pv_notified}
