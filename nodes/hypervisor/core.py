"""Hypervisor core (sans-IO). Hosts many VMs: their RAM and p2m, the forwarding of trapped BAR0
accesses to the mediator, and the hypervisor calls the mediator makes (as kvmgt offers them).

Posted guest writes are pipelined: they are queued per VM and sent to the mediator as one TRAP
batch when the runtime has drained its sockets (or the batch is full); a guest read first flushes
its VM's queue, and travels on the same link, so it is emulated after those writes.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Iterator

import numpy as np

from nodes import hw
from nodes.errors import GvtError, need
from nodes.memory import Layout, OwnedMemory, RegionMemory, make_p2m
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.runtime import Call, Post
from nodes.stats import Stats
from nodes.wire.codec import Envelope

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def guest_name(vm: int) -> str:
    return f"guest{vm}"


class _WriteQueue:
    __slots__ = ("off", "size", "val", "upto", "arrivals")

    def __init__(self) -> None:
        self.off = bytearray()
        self.size = bytearray()
        self.val = bytearray()
        self.upto = 0               # the guest's seq of the last write queued
        self.arrivals: list[tuple[int, int, int]] = []     # (arrival ns, n mmio, n gtt)

    def __len__(self) -> int:
        return len(self.size)


class Vm:
    def __init__(self, vm: int, mem: RegionMemory, p2m: np.ndarray):
        self.id, self.mem, self.p2m = vm, mem, p2m
        self.frames = len(p2m)
        self.pins = np.zeros(self.frames, dtype=np.int64)
        self.queue = _WriteQueue()
        self.msi_injected = 0

    def gpa_to_mfn(self, gpa: int, n: int) -> tuple[int, int]:
        gfn, off = gpa >> hw.PAGE_SHIFT, gpa & (hw.PAGE_SIZE - 1)
        if gpa < 0 or gfn >= self.frames:
            raise GvtError("EFAULT", f"gpa {gpa:#x} is outside VM {self.id}'s RAM")
        if off + n > hw.PAGE_SIZE:
            raise GvtError("EINVAL", f"access of {n} bytes at gpa {gpa:#x} crosses a page")
        return int(self.p2m[gfn]), off


class HypervisorCore:
    role = "hypervisor"

    def __init__(self, layout: Layout, owned: OwnedMemory, vms: dict[int, RegionMemory], seed: int,
                 *, clock: Callable[[], int], mediator: str = "mediator", batch_max: int = 8192):
        self.layout, self.owned, self.clock = layout, owned, clock
        self.mediator = mediator
        self.batch_max = batch_max
        self.vms = {vm: Vm(vm, mem, make_p2m(mem.region, seed)) for vm, mem in vms.items()}
        self._vm_of_link = {guest_name(vm): vm for vm in self.vms}
        self.outbox: list[Any] = []
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        self.stats.counter("gvtbench_msi_injected", "MSIs injected into guests", ["vgpu"])
        self.stats.counter("gvtbench_trap_batches", "TRAP write batches sent to the mediator", ["vgpu"])
        self.stats.counter("gvtbench_guest_access_refused", "Guest accesses refused by the trap layer",
                           ["vgpu"])
        self.stats.gauge("gvtbench_hv_pinned_pages", "Guest pages pinned by the mediator", ["vgpu"])

    # ---- messages ------------------------------------------------------------------------------
    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        guest_vm = self._vm_of_link.get(msg.peer)
        if guest_vm is not None:
            if msg.vgpu != guest_vm:
                # a guest speaks only for its own VM
                raise GvtError("EPERM", f"{msg.peer} may not act for VM {msg.vgpu}")
            return self._from_guest(self.vms[guest_vm], msg, now)
        if kind in ("GFN_PIN", "GFN_UNPIN", "GPA_READ", "GPA_WRITE", "INJECT_MSI"):
            vm = self.vms.get(msg.vgpu)
            if vm is None:
                raise GvtError("ENODEV", f"this hypervisor hosts no VM {msg.vgpu}")
            if kind == "GFN_PIN":
                return self.pin(vm, _u64s(need(p, "gfns", bytes), "gfns"))
            if kind == "GFN_UNPIN":
                return self.unpin(vm, _u64s(need(p, "gfns", bytes), "gfns"))
            if kind == "GPA_READ":
                return self.gpa_read(vm, need(p, "ops", (list, tuple)))
            if kind == "GPA_WRITE":
                return self.gpa_write(vm, need(p, "ops", (list, tuple)))
            vm.msi_injected += 1
            self.stats.inc("gvtbench_msi_injected", (vm.id,))
            return self._inject(vm, p)
        if kind == "DMA_READ":
            return self.owned.dma_read(p)
        if kind == "DMA_WRITE":
            return self.owned.dma_write(p)
        raise GvtError("ENOTSUP", f"the hypervisor does not handle {kind} from {msg.peer}")

    def _inject(self, vm: Vm, p: Any) -> None:
        self.outbox.append(Post(guest_name(vm.id), "IRQ", p if isinstance(p, dict) else {}, vgpu=vm.id))

    def _from_guest(self, vm: Vm, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        if kind == "MMIO_WRITE":
            off, size, val = need(p, "off", int), need(p, "size", int), need(p, "val", int)
            w = _write_no(p)
            if not (0 <= off < 1 << 32 and 0 <= size < 256 and 0 <= val < 1 << 64):
                self.stats.inc("gvtbench_guest_access_refused", (vm.id,))
                raise GvtError("EINVAL", "MMIO_WRITE offset, size or value out of range")
            q = vm.queue
            q.off += _U32.pack(off)
            q.size.append(size)
            q.val += _U64.pack(val)
            q.upto = w
            gtt = off >= hw.GTT_OFFSET
            q.arrivals.append((now, 0 if gtt else 1, 1 if gtt else 0))
            if len(q) >= self.batch_max:
                self.outbox.append(self._flush(vm))
            return None
        if kind == "MMIO_WRITE_BATCH":
            offs, sizes, vals = need(p, "off", bytes), need(p, "size", bytes), need(p, "val", bytes)
            n = len(sizes)
            w = _write_no(p)
            if len(offs) != 4 * n or len(vals) != 8 * n:
                self.stats.inc("gvtbench_guest_access_refused", (vm.id,))
                raise GvtError("EINVAL", "MMIO_WRITE_BATCH needs 4-byte offsets, 1-byte sizes and "
                               "8-byte values, as many of each")
            q = vm.queue
            q.off += offs
            q.size += sizes
            q.val += vals
            q.upto = w
            n_gtt = int(np.count_nonzero(np.frombuffer(offs, dtype="<u4") >= hw.GTT_OFFSET))
            q.arrivals.append((now, n - n_gtt, n_gtt))
            if len(q) >= self.batch_max:
                self.outbox.append(self._flush(vm))
            return None
        if kind == "MMIO_READ":
            off, size = need(p, "off", int), need(p, "size", int)
            if len(vm.queue):
                self.outbox.append(self._flush(vm))
            return self._read(vm, off, size, now)
        if kind == "GPA_READ":
            return self.gpa_read(vm, need(p, "ops", (list, tuple)))
        if kind == "GPA_WRITE":
            return self.gpa_write(vm, need(p, "ops", (list, tuple)))
        raise GvtError("ENOTSUP", f"a guest cannot send {kind} to the hypervisor")

    def _read(self, vm: Vm, off: int, size: int, now: int) -> Iterator[Any]:
        kind = hw.trap_kind(off, False)
        val = yield Call(self.mediator, "TRAP", {"op": "r", "off": off, "size": size}, vgpu=vm.id)
        lab = (vm.id, kind, "hypervisor")
        self.stats.hist(TRAP_LATENCY, lab).record(self.clock() - now)
        self.stats.inc(TRAPS, lab)
        return val

    def _flush(self, vm: Vm) -> Iterator[Any]:
        q = vm.queue
        vm.queue = _WriteQueue()
        self.stats.inc("gvtbench_trap_batches", (vm.id,))
        return self._write_batch(vm, q)

    def _write_batch(self, vm: Vm, q: _WriteQueue) -> Iterator[Any]:
        payload = {"op": "w", "off": bytes(q.off), "size": bytes(q.size), "val": bytes(q.val)}
        try:
            res = yield Call(self.mediator, "TRAP", payload, vgpu=vm.id)
            done = {"upto": q.upto, "n": len(q), "n_errors": res.get("n_errors", 0) if isinstance(res, dict) else 0,
                    "errors": res.get("errors", []) if isinstance(res, dict) else []}
        except GvtError as err:
            done = {"upto": q.upto, "n": len(q), "failed": err.text}
        except Exception as err:     # RemoteError and friends: the guest learns why
            done = {"upto": q.upto, "n": len(q), "failed": str(err)}
        end = self.clock()
        for arrived, n_mmio, n_gtt in q.arrivals:
            for kind, n in (("mmio_write", n_mmio), ("gtt_write", n_gtt)):
                if n:
                    lab = (vm.id, kind, "hypervisor")
                    self.stats.hist(TRAP_LATENCY, lab).record(end - arrived, n)
                    self.stats.inc(TRAPS, lab, n)
        yield Post(guest_name(vm.id), "WRITE_DONE", done, vgpu=vm.id)

    def tick(self, now: int) -> list[Any]:
        out = self.outbox
        self.outbox = []
        for vm in self.vms.values():
            if len(vm.queue):
                out.append(self._flush(vm))
        return out

    # ---- hypervisor calls ------------------------------------------------------------------------
    def pin(self, vm: Vm, gfns: np.ndarray) -> dict:
        """gfn -> mfn for each; 0 where the gfn is not guest RAM (the pin fails)."""
        gfns = gfns.astype(np.int64)
        ok = (gfns >= 0) & (gfns < vm.frames)
        mfns = np.zeros(len(gfns), dtype="<u8")
        good = gfns[ok]
        mfns[ok] = vm.p2m[good]
        np.add.at(vm.pins, good, 1)
        self.stats.set("gvtbench_hv_pinned_pages", (vm.id,), int(np.count_nonzero(vm.pins)))
        return {"mfns": mfns.tobytes()}

    def unpin(self, vm: Vm, gfns: np.ndarray) -> int:
        gfns = gfns.astype(np.int64)
        good = gfns[(gfns >= 0) & (gfns < vm.frames)]
        good = good[vm.pins[good] > 0]
        np.subtract.at(vm.pins, good, 1)
        self.stats.set("gvtbench_hv_pinned_pages", (vm.id,), int(np.count_nonzero(vm.pins)))
        return len(good)

    def gpa_read(self, vm: Vm, ops: list) -> list[bytes]:
        out = []
        for op in ops:
            if not (isinstance(op, (list, tuple)) and len(op) == 2 and type(op[0]) is int and type(op[1]) is int):
                raise GvtError("EINVAL", "GPA_READ op must be [gpa, length]")
            mfn, off = vm.gpa_to_mfn(op[0], op[1])
            out.append(vm.mem.read(mfn, off, op[1]))
        return out

    def gpa_write(self, vm: Vm, ops: list) -> int:
        checked = []
        for op in ops:
            if not (isinstance(op, (list, tuple)) and len(op) == 2 and type(op[0]) is int
                    and isinstance(op[1], bytes)):
                raise GvtError("EINVAL", "GPA_WRITE op must be [gpa, data]")
            mfn, off = vm.gpa_to_mfn(op[0], len(op[1]))
            checked.append((mfn, off, op[1]))
        for mfn, off, data in checked:
            vm.mem.write(mfn, off, data)
        return len(checked)

    def snapshot(self) -> dict:
        return {"vms": {vm.id: {"pinned": int(np.count_nonzero(vm.pins)), "msi": vm.msi_injected}
                        for vm in self.vms.values()}}


def _write_no(p: dict) -> int:
    """The guest's own number of its latest posted write, echoed in WRITE_DONE."""
    w = p.get("w", 0)
    if type(w) is not int:
        raise GvtError("EINVAL", "field 'w' (write number) must be an integer")
    return w


def _u64s(b: bytes, field: str) -> np.ndarray:
    if len(b) % 8:
        raise GvtError("EINVAL", f"field {field!r} must hold packed little-endian u64 values")
    return np.frombuffer(b, dtype="<u8")
