"""The guest's RAM as its CPU sees it: stores and loads by guest physical address through an MMU
model that honours the hypervisor's write protection.

With the shm fabric the guest maps its RAM (the CPU's direct access) and the hypervisor's
write-protect map: a store to an unprotected page lands at once; a store to a protected page (or
to a page with an earlier faulting store still in flight, so order holds) becomes PAGE_FAULT
messages instead, 8 bytes each, as an emulated instruction would write. A store that found its
page unprotected is checked again after it landed; if protection came meanwhile it is sent as a
fault too (writing the same bytes twice is harmless, missing the write is not). With the msg
fabric the guest cannot map its RAM: stores go to the hypervisor as RAM_WRITE and it applies the
same protection there; loads are GPA_READ.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from nodes.actions import Call, Post
from nodes.hw import PAGE_SHIFT, PAGE_SIZE
from nodes.memory import RegionMemory, WriteProtect


class GuestRam:
    def __init__(self, vm: int, frames: int, hypervisor: str, *,
                 attach: Callable[[], tuple[RegionMemory, np.ndarray, WriteProtect]] | None = None):
        """attach (shm): maps the RAM, and gives the p2m and the write-protect map, at first use
        (the hypervisor creates them when it starts)."""
        self.vm, self.frames, self.hv = vm, frames, hypervisor
        self._attach = attach
        self.mem: RegionMemory | None = None
        self.p2m: np.ndarray | None = None
        self.wp: WriteProtect | None = None
        self.direct = attach is not None
        self.faulting: dict[int, int] = {}      # gfn -> faults not yet done
        self.faults = 0

    def store(self, gpa: int, data: bytes, next_w: Callable[[int], int]) -> list[Post]:
        """Store bytes; returns the messages the store turned into (faults, or RAM_WRITE)."""
        if not self.direct:
            return [Post(self.hv, "RAM_WRITE", {"ops": [[a, d] for a, d in _pages(gpa, data)]}, vgpu=self.vm)]
        self._ensure()
        out: list[Post] = []
        for a, d in _pages(gpa, data):
            g = a >> PAGE_SHIFT
            if self.wp.bits[g] or g in self.faulting:
                out += self._faults(a, d, next_w)
                continue
            mfn = int(self.p2m[g])
            self.mem.write(mfn, a & (PAGE_SIZE - 1), d)
            if self.wp.bits[g]:             # protected while we stored: let the mediator see it
                out += self._faults(a, d, next_w)
        return out

    def fault_store(self, gpa: int, data: bytes, next_w: Callable[[int], int]) -> list[Post]:
        """A store sent as PAGE_FAULT whatever the page's protection, for a store whose outcome
        the guest wants to hear (WRITE_DONE: the mediator emulated it, or refused it): the
        hypervisor forwards it if the page is tracked, and stores it plainly if not."""
        return self._faults(gpa, data, next_w)

    def _faults(self, gpa: int, data: bytes, next_w: Callable[[int], int]) -> list[Post]:
        out = []
        for k in range(0, len(data), 8):
            a, piece = gpa + k, data[k:k + 8]
            if a % len(piece) or len(piece) not in (1, 2, 4, 8):
                raise ValueError(f"store of {len(data)} bytes at {gpa:#x} does not split into "
                                 f"aligned pieces")
            g = a >> PAGE_SHIFT
            self.faulting[g] = self.faulting.get(g, 0) + 1
            self.faults += 1
            out.append(Post(self.hv, "PAGE_FAULT", {"gpa": a, "data": piece, "w": next_w(a)}, vgpu=self.vm))
        return out

    def _ensure(self) -> None:
        if self.mem is None and self._attach is not None:
            self.mem, self.p2m, self.wp = self._attach()

    def close(self) -> None:
        if self.mem is not None:
            self.mem.close(unlink=False)
        if self.wp is not None:
            self.wp.close()

    def fault_done(self, gpa: int) -> None:
        g = gpa >> PAGE_SHIFT
        left = self.faulting.get(g, 0) - 1
        if left > 0:
            self.faulting[g] = left
        else:
            self.faulting.pop(g, None)

    def load(self, gpa: int, n: int) -> Iterator[Any]:
        """n bytes at gpa (a task fragment: a GPA_READ per page with the msg fabric)."""
        pieces = []
        at, left = gpa, n
        while left > 0:
            k = min(left, PAGE_SIZE - (at & (PAGE_SIZE - 1)))
            pieces.append((at, k))
            at += k
            left -= k
        if self.direct:
            self._ensure()
            return b"".join(self.mem.read(int(self.p2m[a >> PAGE_SHIFT]), a & (PAGE_SIZE - 1), k)
                            for a, k in pieces)
        got = yield Call(self.hv, "GPA_READ", {"ops": [[a, k] for a, k in pieces]}, vgpu=self.vm)
        return b"".join(got)

    def load_pages(self, first: int, count: int) -> Iterator[Any]:
        """Whole pages [first, first + count) as one bytes object (the isolation sweep)."""
        if self.direct:
            self._ensure()
            return b"".join(self.mem.read(int(self.p2m[g]), 0, PAGE_SIZE)
                            for g in range(first, first + count))
        got = yield Call(self.hv, "GPA_READ", {"ops": [[g << PAGE_SHIFT, PAGE_SIZE]
                                                       for g in range(first, first + count)]},
                         vgpu=self.vm, timeout=60)
        return b"".join(got)


def _pages(gpa: int, data: bytes) -> list[tuple[int, bytes]]:
    out = []
    at = 0
    while at < len(data):
        a = gpa + at
        k = min(len(data) - at, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
        out.append((a, data[at:at + k]))
        at += k
    return out
