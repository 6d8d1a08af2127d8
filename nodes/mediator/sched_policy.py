"""Which vGPU's workload an idle engine runs next (gvt/sched_policy.c's place). This room is the
simple one: each engine runs one workload at a time, and vGPUs with work take turns, round robin.
The weighted time-slice scheduler replaces this class; the rest of the mediator only calls pick().

A vGPU takes part only while it is scheduled (the guest enabled execlists, and no reset stopped
it since: intel_vgpu_start_schedule / intel_vgpu_stop_schedule) and not in failsafe.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from nodes.mediator.scheduler import Workload
    from nodes.mediator.vgpu import VGpu


class RoundRobin:
    def __init__(self) -> None:
        self.last: dict[str, int] = {}      # engine -> the vGPU it served last

    def pick(self, engine: str, vgpus: Iterable[VGpu]) -> Workload | None:
        """The next workload for an idle engine: the head of the next vGPU's queue after the one
        served last that has one waiting."""
        ready = [v for v in vgpus if v.sched_active and v.failsafe is None and v.queues[engine]
                 and v.queues[engine][0].state == "queued"]
        if not ready:
            return None
        ready.sort(key=lambda v: v.id)
        last = self.last.get(engine, -1)
        nxt = next((v for v in ready if v.id > last), ready[0])
        self.last[engine] = nxt.id
        return nxt.queues[engine][0]
