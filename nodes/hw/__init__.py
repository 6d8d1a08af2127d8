"""Hardware facts of the GPU GVT-g virtualizes, defined here once and shared by every role.

The platform modelled is a gen9 part (Skylake / Kaby Lake class) as GVT-g sees it; its GVT-g
rules are the gen8 ones. Sources: drivers/gpu/drm/i915/gvt/ (gvt.c, vgpu.c, gtt.c, handlers.c,
interrupt.c, execlist.c, aperture_gm.c), i915_pvinfo.h, i915_reg.h and gt/ in the Linux kernel.

Submodules: bar0 (the BAR and its decode), gtt (entry format, index and offset helpers), lrc
(context descriptor, context image, status page, CSB entries, PPGTT entries), regs
(registers and their bits), pvinfo (the PV info page), cmd (the command table), partition (vGPU
types and the host's share).
"""
from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

from nodes.hw import bar0, cmd, gtt, lrc, partition, pvinfo, regs  # noqa: E402  (after the units they use)

__all__ = ["KiB", "MiB", "GiB", "PAGE_SHIFT", "PAGE_SIZE", "bar0", "cmd", "gtt", "lrc", "partition",
           "pvinfo", "regs"]
