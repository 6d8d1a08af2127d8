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
