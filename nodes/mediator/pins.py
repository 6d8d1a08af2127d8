"""gfn -> mfn pins of one vGPU, with the number of holders of each gfn (kvmgt's gvt_dma cache with
its reference counts). The GGTT shadow holds a gfn per entry that maps it; the PPGTT shadow will
hold them the same way, so a page both use is pinned at the hypervisor once and unpinned only
when the last holder lets go.

`cache` is what the translator reads: 0 = not pinned, CACHE_INVALID = the pin failed (not guest
RAM), anything else is the machine frame.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from nodes.actions import Call, Post
from nodes.errors import GvtError
from nodes.mediator.translate import CACHE_INVALID

_INVALID = np.uint64(CACHE_INVALID)
# Shorter than the hypervisor's wait for the trapped access that needs the pin, so a pin that
# does not come fails that access with a reason instead of leaving its outcome unknown.
PIN_TIMEOUT_S = 5.0


class GfnPins:
    def __init__(self, vgpu: int, gfns: int, hypervisor: str):
        self.vgpu, self.hypervisor = vgpu, hypervisor
        self.cache = np.zeros(gfns, dtype=np.uint64)
        self.refs = np.zeros(gfns, dtype=np.int64)
        self.pin_calls = 0

    def fetch(self, gfns: np.ndarray) -> Iterator[Any]:
        """Pin the gfns the cache does not know yet (a task fragment). Raises the GvtError of a
        refused or timed-out GFN_PIN with the cache unchanged."""
        gfns = np.unique(gfns.astype(np.int64))
        gfns = gfns[(gfns >= 0) & (gfns < len(self.cache))]
        gfns = gfns[self.cache[gfns] == 0]
        if not len(gfns):
            return
        self.pin_calls += 1
        reply = yield Call(self.hypervisor, "GFN_PIN", {"gfns": gfns.astype("<u8").tobytes()},
                           vgpu=self.vgpu, timeout=PIN_TIMEOUT_S)
        mfns = np.frombuffer(reply["mfns"], dtype="<u8").astype(np.uint64)
        if len(mfns) != len(gfns):
            raise GvtError("EPROTO", f"GFN_PIN answered {len(mfns)} mfns for {len(gfns)} gfns")
        self.cache[gfns] = np.where(mfns == 0, _INVALID, mfns)

    def pinned(self, gfns: np.ndarray) -> np.ndarray:
        """Which of these gfns are pinned (so an entry mapping them holds a pin)."""
        gfns = gfns.astype(np.int64, copy=False)
        ok = (gfns >= 0) & (gfns < len(self.cache))
        v = self.cache[np.where(ok, gfns, 0)]
        return ok & (v != 0) & (v != _INVALID)

    def hold(self, gfns: np.ndarray) -> None:
        if len(gfns):
            np.add.at(self.refs, gfns, 1)

    def release(self, gfns: np.ndarray) -> None:
        """Give back holds. Releasing more than was held is the mediator's own bug: it raises
        before changing anything (an internal error, never a silent negative count)."""
        if not len(gfns):
            return
        uniq, n = np.unique(gfns.astype(np.int64, copy=False), return_counts=True)
        short = self.refs[uniq] < n
        if short.any():
            g = int(uniq[short][0])
            raise RuntimeError(f"vGPU {self.vgpu}: gfn {g:#x} released {int(n[short][0])} times, "
                               f"held {int(self.refs[g])} times")
        self.refs[uniq] -= n

    def settle(self, candidates: np.ndarray) -> Post | None:
        """Unpin those of the candidate gfns nothing holds any more (released, or pinned for an
        entry that did not keep them): one GFN_UNPIN, or None."""
        if not len(candidates):
            return None
        cand = np.unique(candidates.astype(np.int64))
        cand = cand[self.pinned(cand)]
        gone = cand[self.refs[cand] == 0]
        if not len(gone):
            return None
        self.cache[gone] = 0
        return Post(self.hypervisor, "GFN_UNPIN", {"gfns": gone.astype("<u8").tobytes()}, vgpu=self.vgpu)

    def count(self) -> int:
        """gfns held by at least one entry."""
        return int(np.count_nonzero(self.refs))
