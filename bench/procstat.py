"""What a run's processes cost the machine, read from /proc: CPU seconds (user + system, every
thread: the ZeroMQ I/O thread too) and resident memory, and the operations they carried per
CPU-second. Linux only; elsewhere the figures are absent, never guessed."""
from __future__ import annotations

import os
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Sample:
    cpu_s: float            # user + system CPU time so far
    rss_mib: float          # resident set now
    hwm_mib: float          # the largest resident set so far


def sample(pid: int) -> Sample | None:
    """The process's CPU time and memory now (None: it is gone, or this is not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # the command name may hold spaces and parentheses: fields count from the last ')'
            fields = f.read().rsplit(b")", 1)[1].split()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read().decode(errors="replace")
    except OSError:
        return None
    mem = {}
    for line in status.splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = int(val.split()[0]) / 1024       # kB
    return Sample((int(fields[11]) + int(fields[12])) / _TICK, mem.get("VmRSS", 0.0),
                  mem.get("VmHWM", 0.0))


def usage(before: dict[str, int | Sample | None], after: dict[str, Sample | None],
          vgpus_of: dict[str, int]) -> dict:
    """CPU seconds each process spent between two samples and its memory at the second, with
    totals and per-vGPU shares (`vgpus_of`: how many vGPUs each process serves; the run's vGPU
    count for the shared roles)."""
    procs = {}
    for name, a in after.items():
        b = before.get(name)
        if not isinstance(a, Sample) or not isinstance(b, Sample):
            continue
        procs[name] = {"cpu_s": round(max(0.0, a.cpu_s - b.cpu_s), 3), "rss_mib": round(a.rss_mib, 1),
                       "hwm_mib": round(a.hwm_mib, 1), "vgpus": vgpus_of.get(name, 0)}
    return {"processes": procs,
            "cpu_s": round(sum(p["cpu_s"] for p in procs.values()), 3),
            "rss_mib": round(sum(p["rss_mib"] for p in procs.values()), 1)}
