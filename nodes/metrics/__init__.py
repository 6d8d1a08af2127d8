"""Metric families shared by several roles, declared once so names and labels agree.

Cores count into plain nodes.stats.Stats objects; nodes.metrics.export turns them into
Prometheus families on scrape (the only module that imports prometheus_client).
"""
from __future__ import annotations

from nodes.stats import Stats

TRAP_LATENCY = "gvtbench_trap_latency_seconds"
TRAPS = "gvtbench_traps"


def declare_trap_metrics(stats: Stats) -> None:
    stats.histogram(TRAP_LATENCY,
                    "Trap latency: guest = issue to completion as the vCPU sees it (open loop: from "
                    "the intended issue time); hypervisor = trap to the mediator's completion; "
                    "mediator = emulation; gpu = the physical access",
                    ["vgpu", "kind", "stage"])
    stats.counter(TRAPS, "Guest accesses trapped and emulated", ["vgpu", "kind", "stage"])


WORKLOAD_LATENCY = "gvtbench_workload_latency_seconds"
WORKLOAD_STATUSES = ("completed", "failed")


def declare_workload_metrics(stats: Stats) -> None:
    stats.histogram(WORKLOAD_LATENCY,
                    "Workload latency: guest = ELSP submission (open loop: the intended time) to "
                    "the guest retiring it on the interrupt; mediator = the workload's creation at "
                    "the ELSP write to its completion",
                    ["vgpu", "engine", "stage"])
    stats.counter("gvtbench_workloads", "Workloads that ended, by engine and status",
                  ["vgpu", "engine", "status"])
    stats.gauge("gvtbench_shadow_pages", "Shadow PPGTT pages in the host pool", ["vgpu"])
    stats.gauge("gvtbench_tracked_writes", "Guest writes to write-protected page tables emulated",
                ["vgpu"])
    stats.gauge("gvtbench_context_switches", "Virtual context switches (CSB schedule-outs)", ["vgpu"])
    stats.gauge("gvtbench_virtual_irqs", "Virtual interrupts injected (MSIs sent to the hypervisor)",
                ["vgpu"])
