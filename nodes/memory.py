"""Machine memory and the fabric: the one way any node reads or writes a machine frame (mfn).

Machine memory is a set of regions: the host pool (owner: the mediator) and each VM's RAM (owner:
its hypervisor). Backend `shm` maps a region's file in /dev/shm directly (same host); backend `msg`
sends DMA_READ / DMA_WRITE to the region's owner (any host). Both give the same bytes.
"""
from __future__ import annotations

import bisect
import mmap
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from nodes.actions import Call
from nodes.errors import GvtError
from nodes.hw import PAGE_SIZE
from nodes.wire.codec import check_reply_size

SHM_DIR = "/dev/shm"
SHM_PREFIX = "gvtbench-"
FIRST_MFN = 0x1000       # machine frames below this belong to nobody: a stray access faults
LOCAL_PAGES = 1 << 16    # pages whose place a Fabric remembers


@dataclass(frozen=True)
class Region:
    name: str           # "host<G>" (GPU G's host pool) or "vm<N>"
    base_mfn: int
    frames: int
    owner: str          # node name that serves DMA for it
    vm: int             # 0 for the host pool

    @property
    def end_mfn(self) -> int:
        return self.base_mfn + self.frames


class Layout:
    """Where each region sits in machine frame space; derived from the config alone, so every
    node (on any host) computes the same layout."""

    def __init__(self, regions: list[Region]):
        self.regions = sorted(regions, key=lambda r: r.base_mfn)
        self._bases = [r.base_mfn for r in self.regions]
        self._ends = [r.end_mfn for r in self.regions]
        self.by_name = {r.name: r for r in self.regions}
        self._host = next((r for r in self.regions if r.vm == 0), None)

    @classmethod
    def build(cls, host_pool_frames: int, vm_frames: dict[int, int],
              hypervisor: str | dict[int, str] = "hypervisor", mediator: str = "mediator",
              gpu: int = 0) -> "Layout":
        """One GPU's machine memory (its DMA space): its host pool, then its VMs' RAM, each
        owned by its VM's hypervisor (one name for all, or VM -> name)."""
        regions = [Region(f"host{gpu}", FIRST_MFN, host_pool_frames, mediator, 0)]
        nxt = FIRST_MFN + host_pool_frames
        for vm in sorted(vm_frames):
            owner = hypervisor if isinstance(hypervisor, str) else hypervisor[vm]
            regions.append(Region(f"vm{vm}", nxt, vm_frames[vm], owner, vm))
            nxt += vm_frames[vm]
        return cls(regions)

    def region_of(self, mfn: int) -> Region | None:
        i = bisect.bisect_right(self._bases, mfn) - 1
        if i >= 0 and mfn < self._ends[i]:
            return self.regions[i]
        return None

    def vm_region(self, vm: int) -> Region:
        return self.by_name[f"vm{vm}"]

    @property
    def host(self) -> Region:
        if self._host is None:
            raise KeyError("this layout has no host pool")
        return self._host

    def to_wire(self) -> list:
        return [[r.name, r.base_mfn, r.frames, r.owner, r.vm] for r in self.regions]


def make_p2m(region: Region, seed: int) -> np.ndarray:
    """The VM's guest-physical -> machine map: a seeded permutation of its region, never the
    identity, so an address the mediator forgot to translate lands on a wrong page."""
    rng = np.random.default_rng([seed, region.vm, 0x9E37])
    perm = rng.permutation(region.frames).astype(np.uint64)
    if region.frames > 1 and np.array_equal(perm, np.arange(region.frames, dtype=np.uint64)):
        perm = np.roll(perm, 1)
    return perm + np.uint64(region.base_mfn)


def shm_path(run_id: str, region: str) -> str:
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}{run_id}-{region}")


def _shm_create(path: str, size: int) -> mmap.mmap:
    """A zeroed /dev/shm file of `size` bytes, mapped; only this user may open it. A file the
    owner's earlier incarnation left (it was killed and started again) is zeroed in place, not
    replaced: the nodes that map it keep the same pages (a new file would leave them on the old
    one, and truncating it would fault their accesses)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size)
        buf = mmap.mmap(fd, size)
        _zero(buf)
        return buf
    finally:
        os.close(fd)


def _zero(buf: Any) -> None:
    np.frombuffer(buf, dtype=np.uint8)[:] = 0


def _shm_attach(path: str, size: int, writable: bool, missing: str) -> mmap.mmap:
    """Map an existing /dev/shm file another node made; ENOENT with `missing` if it is not there."""
    try:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        raise GvtError("ENOENT", missing) from None
    try:
        return mmap.mmap(fd, size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)


class RegionMemory:
    """The bytes of one region: a /dev/shm file (shm) or anonymous memory (msg)."""

    def __init__(self, region: Region, buf: mmap.mmap, path: str | None, owned: bool):
        self.region, self.buf, self.path, self.owned = region, buf, path, owned
        self.view = memoryview(buf)

    @classmethod
    def create(cls, region: Region, backend: str, run_id: str) -> "RegionMemory":
        size = region.frames * PAGE_SIZE
        if backend == "shm":
            path = shm_path(run_id, region.name)
            return cls(region, _shm_create(path, size), path, True)
        return cls(region, mmap.mmap(-1, size), None, True)

    @classmethod
    def attach(cls, region: Region, run_id: str) -> "RegionMemory":
        path = shm_path(run_id, region.name)
        buf = _shm_attach(path, region.frames * PAGE_SIZE, True,
                          f"region {region.name} has no shm file {path}: is its owner "
                          f"{region.owner} running on this host with the shm fabric?")
        return cls(region, buf, path, False)

    def _span(self, mfn: int, off: int, n: int) -> int:
        if not (0 <= off and n >= 0 and off + n <= PAGE_SIZE):
            raise GvtError("EINVAL", f"access of {n} bytes at offset {off} crosses a page")
        return (mfn - self.region.base_mfn) * PAGE_SIZE + off

    def zero(self) -> None:
        """Every byte of the region to zero (a VM started again gets empty RAM)."""
        _zero(self.buf)

    def read(self, mfn: int, off: int, n: int) -> bytes:
        a = self._span(mfn, off, n)
        return bytes(self.view[a:a + n])

    def write(self, mfn: int, off: int, data: bytes) -> None:
        a = self._span(mfn, off, len(data))
        self.view[a:a + len(data)] = data

    def close(self, unlink: bool) -> None:
        try:
            self.view.release()
            self.buf.close()
        except (BufferError, ValueError):
            pass
        if unlink and self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class WriteProtect:
    """A VM's write-protect bitmap (one byte per guest page), owned by its hypervisor: the page
    tracking of kvmgt's kvm_page_track. With the shm fabric it is a file in /dev/shm the guest
    maps read-only, so the guest's MMU model sees which stores fault; otherwise plain memory."""

    def __init__(self, frames: int, buf: Any, path: str | None, owned: bool):
        self.frames, self.buf, self.path, self.owned = frames, buf, path, owned
        self.bits = np.frombuffer(buf, dtype=np.uint8, count=frames)

    @classmethod
    def create(cls, region: Region, backend: str, run_id: str) -> "WriteProtect":
        if backend != "shm":
            return cls(region.frames, bytearray(region.frames), None, True)
        path = shm_path(run_id, f"{region.name}.wp")
        return cls(region.frames, _shm_create(path, region.frames), path, True)

    @classmethod
    def attach(cls, region: Region, run_id: str) -> "WriteProtect":
        path = shm_path(run_id, f"{region.name}.wp")
        buf = _shm_attach(path, region.frames, False,
                          f"VM {region.vm} has no write-protect map {path}: is its hypervisor on "
                          f"this host with the shm fabric?")
        return cls(region.frames, buf, path, False)

    def close(self) -> None:
        self.bits = np.zeros(0, dtype=np.uint8)
        if isinstance(self.buf, mmap.mmap):
            try:
                self.buf.close()
            except (BufferError, ValueError):
                pass
        if self.owned and self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class OwnedMemory:
    """The regions a node owns, and its service of DMA requests from the fabric's msg backend."""

    KINDS = ("DMA_READ", "DMA_WRITE")

    def __init__(self, layout: Layout):
        self.layout = layout
        self.mem: dict[str, RegionMemory] = {}

    def add(self, rm: RegionMemory) -> None:
        self.mem[rm.region.name] = rm

    def lookup(self, mfn: int) -> RegionMemory:
        r = self.layout.region_of(mfn)
        rm = self.mem.get(r.name) if r else None
        if rm is None:
            raise GvtError("EFAULT", f"mfn {mfn:#x} is not in a region this node owns")
        return rm

    def serve(self, msg: Any, now: int) -> Any:
        """DMA_READ / DMA_WRITE from the gpu (payload checked by the wire schema)."""
        ops = msg.payload["ops"]
        if msg.kind == "DMA_READ":
            check_reply_size(sum(op[2] for op in ops), len(ops), "DMA_READ")
            return [self.lookup(mfn).read(mfn, off, n) for mfn, off, n in ops]
        checked = []
        for mfn, off, data in ops:  # check all before writing any: a bad batch changes nothing
            rm = self.lookup(mfn)
            rm._span(mfn, off, len(data))
            checked.append((rm, mfn, off, data))
        for rm, mfn, off, data in checked:
            rm.write(mfn, off, data)
        return len(checked)

    def close(self) -> None:
        for rm in self.mem.values():
            rm.close(unlink=rm.owned)
        self.mem.clear()


class Fabric:
    """Writes to machine memory by a node that does not own it (the gpu's DMA).

    Methods are task fragments: `yield from fabric.write_many(...)`. With shm they complete
    without yielding; with msg they yield one Call per owner.
    """

    def __init__(self, layout: Layout, backend: str, run_id: str, owned: OwnedMemory | None = None):
        if backend not in ("shm", "msg"):
            raise GvtError("EINVAL", f"fabric backend must be 'shm' or 'msg', not {backend!r}")
        self.layout, self.backend, self.run_id = layout, backend, run_id
        self.owned = owned
        self._attached: dict[str, RegionMemory] = {}
        # mfn -> its region's bytes mapped here, or None (not mapped here): the walkers ask for
        # the same pages over and over (LOCAL_PAGES of them are kept)
        self._pages: dict[int, RegionMemory | None] = {}

    def _region(self, mfn: int) -> Region:
        r = self.layout.region_of(mfn)
        if r is None:
            raise GvtError("EFAULT", f"DMA to mfn {mfn:#x}, which is in no memory region")
        return r

    def _local(self, r: Region) -> RegionMemory | None:
        if self.owned is not None and r.name in self.owned.mem:
            return self.owned.mem[r.name]
        if self.backend == "shm":
            rm = self._attached.get(r.name)
            if rm is None:
                rm = self._attached[r.name] = RegionMemory.attach(r, self.run_id)
            return rm
        return None

    def _mapped(self, mfn: int) -> RegionMemory | None:
        """The bytes of the page's region when they are mapped here (shm, or owned), else None
        (not mapped here, or in no region), remembered per page."""
        pages = self._pages
        try:
            return pages[mfn]
        except KeyError:
            pass
        r = self.layout.region_of(mfn)
        rm = self._local(r) if r is not None else None
        if len(pages) >= LOCAL_PAGES:
            pages.clear()
        pages[mfn] = rm
        return rm

    def write_many(self, ops: list[tuple[int, int, bytes]]) -> Iterator[Any]:
        remote: dict[str, list[list]] = {}
        for mfn, off, data in ops:
            rm = self._mapped(mfn)
            if rm is not None:
                rm.write(mfn, off, data)
            else:
                remote.setdefault(self._region(mfn).owner, []).append([mfn, off, data])
        for owner, batch in remote.items():
            yield Call(owner, "DMA_WRITE", {"ops": batch})
        return len(ops)

    def read_many(self, ops: list[tuple[int, int, int]]) -> Iterator[Any]:
        """[(mfn, offset, length)] -> the bytes of each, in order (a task fragment)."""
        out: list[bytes | None] = [None] * len(ops)
        remote: dict[str, tuple[list[int], list[list]]] = {}
        for i, (mfn, off, n) in enumerate(ops):
            rm = self._mapped(mfn)
            if rm is not None:
                out[i] = rm.read(mfn, off, n)
            else:
                at, batch = remote.setdefault(self._region(mfn).owner, ([], []))
                at.append(i)
                batch.append([mfn, off, n])
        for owner, (at, batch) in remote.items():
            got = yield Call(owner, "DMA_READ", {"ops": batch})
            if len(got) != len(batch):
                raise GvtError("EPROTO", f"DMA_READ of {len(batch)} ops answered {len(got)}")
            for i, data in zip(at, got):
                out[i] = data
        return out

    def read(self, mfn: int, off: int, n: int) -> Iterator[Any]:
        return (yield from self.read_many([(mfn, off, n)]))[0]

    def local_view(self, mfn: int) -> memoryview | None:
        """The page's bytes when its region is mapped here (shm, or owned), else None: a walker
        that reads many small pieces uses it instead of a message each."""
        rm = self._mapped(mfn)
        if rm is None:
            return None
        a = (mfn - rm.region.base_mfn) * PAGE_SIZE
        return rm.view[a:a + PAGE_SIZE]

    def close(self) -> None:
        self._pages.clear()
        for rm in self._attached.values():
            rm.close(unlink=False)
        self._attached.clear()


def _remove_shm(keep: Callable[[str], bool]) -> list[str]:
    removed = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(SHM_PREFIX) and not keep(name):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def sweep_stale_shm() -> list[str]:
    """Remove region files of runs whose launcher is gone (a crash or SIGKILL of a launcher)."""
    pat = re.compile(rf"^{SHM_PREFIX}(\d+)x[0-9a-f]+-")

    def keep(name: str) -> bool:
        m = pat.match(name)
        return not m or _pid_alive(int(m.group(1)))
    return _remove_shm(keep)


def remove_run_shm(run_id: str) -> list[str]:
    """Remove every region file of one run."""
    return _remove_shm(lambda name: not name.startswith(f"{SHM_PREFIX}{run_id}-"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
