"""Page tracking (gvt/page_track.c, kvmgt's kvm_page_track): the guest pages whose writes the
mediator must see, write-protected at the hypervisor. A write to one traps there and comes here as
TRACKED_WRITE, on the vGPU's lane (after the guest's earlier MMIO writes); the hypervisor stores
it in guest RAM once this side has emulated it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nodes.actions import Call
from nodes.errors import GvtError
from nodes.hw import PAGE_SHIFT

Handler = Callable[[int, bytes], Iterator[Any]]


class PageTrack:
    def __init__(self, vgpu: int, hypervisor: str):
        self.vgpu, self.hypervisor = vgpu, hypervisor
        self.handlers: dict[int, Handler] = {}      # gfn -> what emulates writes to it
        self.writes = 0
        self.dropped_in_failsafe = 0

    def tracked(self, gfn: int) -> bool:
        return gfn in self.handlers

    def enable(self, gfns: list[int], handler: Handler) -> Iterator[Any]:
        """Write-protect gfns at the hypervisor (intel_vgpu_enable_page_track). Returns once it
        has (a guest write after that traps, so a page read afterwards cannot miss one), with
        whether any gfn was newly tracked. Nothing is tracked if the hypervisor refuses."""
        new = [g for g in gfns if g not in self.handlers]
        if new:
            yield Call(self.hypervisor, "PAGE_TRACK",
                       {"gfns": np.array(new, dtype="<u8").tobytes(), "enable": True}, vgpu=self.vgpu)
        for g in gfns:
            self.handlers[g] = handler
        return bool(new)

    def disable(self, gfns: list[int]) -> Iterator[Any]:
        gone = [g for g in gfns if self.handlers.pop(g, None) is not None]
        if gone:
            yield Call(self.hypervisor, "PAGE_TRACK",
                       {"gfns": np.array(gone, dtype="<u8").tobytes(), "enable": False}, vgpu=self.vgpu)

    def drop_all(self) -> Iterator[Any]:
        """Failsafe and resets: nothing is tracked any more."""
        yield from self.disable(list(self.handlers))

    def on_write(self, gpa: int, data: bytes, failsafe: bool = False) -> Iterator[Any]:
        """A guest write to a page this vGPU tracked (intel_vgpu_page_track_handler). A page no
        longer tracked (the hypervisor sent the write before it heard) needs nothing here. In
        failsafe the write is not emulated and the page's write protection goes, so no later
        write to it traps."""
        if len(data) not in (4, 8) or gpa % len(data):
            raise GvtError("EINVAL", f"tracked write of {len(data)} bytes at gpa {gpa:#x}: only "
                           f"aligned 4- or 8-byte writes reach a page table")
        gfn = gpa >> PAGE_SHIFT
        handler = self.handlers.get(gfn)
        if handler is None:
            return
        if failsafe:
            self.dropped_in_failsafe += 1
            yield from self.disable([gfn])
            return
        self.writes += 1
        yield from handler(gpa, data)
