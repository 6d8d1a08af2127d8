"""Metric families shared by several roles, declared once so names and labels agree.

Cores count into plain nodes.stats.Stats objects; nodes.metrics.export turns them into
Prometheus families on scrape (the only module that imports prometheus_client).
"""
from __future__ import annotations

from nodes.stats import Stats

TRAP_LATENCY = "gvtbench_trap_latency_seconds"
TRAPS = "gvtbench_traps"
CMD_SCAN_SECONDS = "gvtbench_cmd_scan_seconds"


def declare_trap_metrics(stats: Stats) -> None:
    stats.histogram(TRAP_LATENCY,
                    "Trap latency: guest = issue to completion as the vCPU sees it (open loop: from "
                    "the intended issue time); hypervisor = trap to the mediator's completion; "
                    "mediator = emulation; gpu = the physical access",
                    ["vgpu", "kind", "stage"])
    stats.counter(TRAPS, "Guest accesses trapped and emulated", ["vgpu", "kind", "stage"])


WORKLOAD_LATENCY = "gvtbench_workload_latency_seconds"
WORKLOADS = "gvtbench_workloads"
WORKLOAD_STATUSES = ("completed", "failed")


def declare_workload_metrics(stats: Stats) -> None:
    stats.histogram(WORKLOAD_LATENCY,
                    "Workload latency: guest = ELSP submission (open loop: the intended time) to "
                    "the guest retiring it on the interrupt; mediator = the workload's creation at "
                    "the ELSP write to its completion",
                    ["vgpu", "engine", "stage"])
    stats.counter(WORKLOADS, "Workloads that ended, by engine, status and where they were counted "
                  "(guest = retired by the guest; mediator = completed on the GPU)",
                  ["vgpu", "engine", "stage", "status"])


GPU_BUSY_SECONDS = "gvtbench_gpu_busy_seconds"
MMIO_SWITCH_SECONDS = "gvtbench_mmio_switch_seconds"
SCHED_LATENCY = "gvtbench_sched_latency_seconds"
HOST_RESETS = "gvtbench_host_engine_resets"


def declare_sched_metrics(stats: Stats) -> None:
    """The scheduler's (sched_policy, mmio_context): who owns the GPU and what sharing costs."""
    stats.counter(GPU_BUSY_SECONDS, "Engine time of the vGPU's workloads: each one's dispatch "
                  "to its interrupt", ["vgpu", "engine"])
    stats.gauge("gvtbench_gpu_owner_seconds", "Time the vGPU has owned the GPU (the time-slice "
                "policy's sched_time, what its share is charged)", ["vgpu"])
    stats.gauge("gvtbench_gpu_share", "The vGPU's share of GPU ownership time so far", ["vgpu"])
    stats.gauge("gvtbench_weight_share", "The vGPU's weight over all vGPUs' weights: the share "
                "the time-slice policy aims at", ["vgpu"])
    stats.gauge("gvtbench_timeslice_left_seconds", "The vGPU's time slice left in this balance "
                "period (negative: a debt it pays back)", ["vgpu"])
    stats.gauge("gvtbench_vgpu_switches", "vGPU switches: times the GPU changed owner")
    stats.histogram(SCHED_LATENCY, "Scheduler latency: a workload queued (the ELSP write) to its "
                    "dispatch to the GPU", ["vgpu"])
    stats.counter(HOST_RESETS, "Engines the host's hang detection reset under a vGPU's workload "
                  "that did not complete in time", ["vgpu", "engine"])
    stats.histogram(MMIO_SWITCH_SECONDS, "The engine MMIO context switch at a change of an "
                    "engine's owner (save and restore over the gpu link)", ["engine"])


def declare_shadow_metrics(stats: Stats) -> None:
    """The mediator's view of a vGPU's GPU state (gauges of pages held, counters of events)."""
    stats.gauge("gvtbench_shadow_pages", "Shadow PPGTT pages the vGPU holds in the host pool",
                ["vgpu"])
    stats.counter("gvtbench_ppgtt_tracked_writes",
                  "Guest writes to write-protected PPGTT page tables emulated", ["vgpu"])
    stats.counter("gvtbench_ppgtt_entries_translated",
                  "Guest PPGTT entries shadowed, by result: ok (a leaf entry mapped), invalid (a "
                  "present entry whose gfn is not the VM's: the scratch page), huge_2m (a 2 MiB "
                  "entry kept 2 MiB), split_2m (a 2 MiB entry split into a 4 KiB table), split_64k "
                  "(a 64 KiB entry split into 16 4 KiB ones)",
                  ["vgpu", "result"])
    stats.counter("gvtbench_context_switches", "Virtual context switches (CSB schedule-outs)",
                  ["vgpu"])
    stats.counter("gvtbench_ppgtt_reclaimed", "PPGTT shadows dropped to make room under the vGPU's "
                  "quota of host pool pages (reclaim_one_ppgtt_mm)", ["vgpu"])
    stats.gauge("gvtbench_pool_pages", "Host pool pages a vGPU holds (shadow tables, rings, "
                "contexts, batches), against its quota", ["vgpu", "state"])
    stats.counter("gvtbench_virtual_irqs",
                  "Virtual interrupts raised (MSIs sent to the hypervisor)", ["vgpu"])
