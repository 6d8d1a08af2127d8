"""Hypervisor core (sans-IO). Hosts many VMs: their RAM and p2m, the trap of their BAR0 accesses
to the mediator, and the hypervisor calls the mediator makes (as kvmgt offers them).

Posted guest writes are queued per VM and go to the mediator as TRAP_WRITE batches when the shell
has drained its sockets. A batch that is not full goes only when none of its VM's is in flight:
the mediator emulates a vGPU's batches one after another anyway, and what comes in meanwhile goes
as one larger batch (fewer messages for every node: 80k posted writes/s against 60k when any
batch could go, on two cores). Full batches go up to BATCHES_IN_FLIGHT at a time, so a long
stream keeps the link busy while the mediator works. A VM that floods
waits in its own queue rather than in the link the mediator shares with every VM; past a bound its writes
are refused (EAGAIN in WRITE_DONE): backpressure toward that guest. A read waits until the
writes its guest made before it have gone out, then travels on the same link, so the mediator
emulates it after them.

Page tracking (kvmgt's kvm_page_track): the mediator write-protects guest pages (PAGE_TRACK). A
guest store to such a page faults (PAGE_FAULT, or a RAM_WRITE that hits one) and takes its place
in the VM's fifo: it goes to the mediator as TRACKED_WRITE after the VM's earlier writes, is stored
in guest RAM once the mediator has emulated it, and nothing behind it in the fifo moves before
that (the vCPU is stopped on the fault).

Tracing: a sampled guest operation's id comes with its message. The core keeps it with what it
queues (a batch takes the id of the first sampled write in it; the others' traces end here, at
their arrival), and forwards a batch or a fault as a traced Spawn, so the shell times the forward
and the mediator's call carries the id.
"""
from __future__ import annotations

import struct
from collections import deque
from types import GeneratorType
from typing import Any, Iterator

import numpy as np

from nodes.core import Core
from nodes.actions import Call, Event, Now, Post, Signal, Sleep, Spawn, Wait
from nodes.errors import GvtError, OutcomeUnknown, RemoteError
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, bar0
from nodes.memory import Layout, RegionMemory, WriteProtect, make_p2m
from nodes.metrics import TRAP_LATENCY, TRAPS, declare_trap_metrics
from nodes.stats import Stats
from nodes.wire.codec import MAX_POSTED_WRITES, Envelope, check_reply_size
from nodes.wire.schema import guest_name, write_batch_len

BATCH_MAX = 4096                # writes per TRAP_WRITE
BATCHES_IN_FLIGHT = 4           # per VM, of full batches; a partial one goes only alone
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
ERRORS_KEPT = 8


class _Writes:
    """Posted writes of one VM, in guest order, that go to the mediator as one batch."""
    __slots__ = ("off", "size", "val", "first", "last", "arrivals", "msgs", "trace", "in_order")

    def __init__(self, first: int) -> None:
        self.off = bytearray()
        self.size = bytearray()
        self.val = bytearray()
        self.first = first          # the guest's number of the first and last write message here
        self.last = first
        self.arrivals: list[tuple[int, int, int]] = []     # (arrival ns, n mmio, n gtt)
        self.msgs: list[tuple[int, int]] = []   # (the guest's number, writes) of each message
        self.trace = 0              # the first sampled operation among its writes
        self.in_order = True        # each message's number is one more than the one before

    def __len__(self) -> int:
        return len(self.size)


class _Fault:
    """A guest store to a write-protected page, waiting for its turn in the fifo."""
    __slots__ = ("gpa", "data", "w", "trace")

    def __init__(self, gpa: int, data: bytes, w: int, trace: int = 0):
        self.gpa, self.data, self.w, self.trace = gpa, data, w, trace


class Vm:
    def __init__(self, vm: int, mem: RegionMemory, p2m: np.ndarray, wp: WriteProtect):
        self.id, self.mem, self.p2m, self.wp = vm, mem, p2m, wp
        self.frames = len(p2m)
        self.pins = np.zeros(self.frames, dtype=np.int64)
        self.track = np.zeros(self.frames, dtype=np.int32)      # page-track references per gfn
        self.fifo: deque[_Writes | Event | _Fault] = deque()    # writes, faults, reads held behind them
        self.faulting = False       # a tracked write is with the mediator: the fifo waits
        self.faults_queued: dict[int, int] = {}    # gfn -> faults in the fifo
        self.tracked_writes = 0
        self.queued = 0             # writes in the fifo
        self.in_flight = 0          # writes sent, not answered
        self.batches = 0            # TRAP_WRITE calls in flight
        self.msi_injected = 0
        self.msi_merged = 0
        self.gen = 0                # the guest's incarnation: a new process of it is a new VM
        self.resetting: Event | None = None     # set while the VM is being made new: traps wait
        self.restarts = 0
        self.device_lost: str | None = None     # why the vGPU is gone, until the VM resets

    def gpa_to_mfn(self, gpa: int, n: int) -> tuple[int, int]:
        gfn, off = gpa >> PAGE_SHIFT, gpa & (PAGE_SIZE - 1)
        if gfn >= self.frames:
            raise GvtError("EFAULT", f"gpa {gpa:#x} is outside VM {self.id}'s RAM")
        if off + n > PAGE_SIZE:
            raise GvtError("EINVAL", f"access of {n} bytes at gpa {gpa:#x} crosses a page")
        return int(self.p2m[gfn]), off


class HypervisorCore(Core):
    role = "hypervisor"

    def __init__(self, layout: Layout, vms: dict[int, RegionMemory], seed: int, *,
                 wps: dict[int, WriteProtect] | None = None,
                 mediator: str = "mediator", batch_max: int = BATCH_MAX,
                 batches_in_flight: int = BATCHES_IN_FLIGHT, max_posted: int = MAX_POSTED_WRITES,
                 call_timeout: float = 10.0, restarted: bool = False):
        super().__init__()
        self.layout = layout
        self.mediator = mediator
        self.batch_max, self.batches_in_flight = batch_max, batches_in_flight
        self.max_posted, self.call_timeout = max_posted, call_timeout
        wps = wps or {}
        self.vms = {vm: Vm(vm, mem, make_p2m(mem.region, seed),
                           wps.get(vm) or WriteProtect.create(mem.region, "msg", ""))
                    for vm, mem in vms.items()}
        self._dirty: set[int] = set()       # VMs whose fifo has something to send
        if restarted:               # closed until restart_vms() has made each VM new
            for vm in self.vms.values():
                vm.resetting = Event(f"vm{vm.id} restart")
        self._irqs: dict[int, int | None] = {}     # VM -> MSI vector to deliver at the next tick
        self._irq_traces: dict[int, int] = {}       # VM -> the first sampled operation among them
        self.stats = Stats()
        declare_trap_metrics(self.stats)
        s = self.stats
        s.counter("gvtbench_msi_injected", "MSIs injected into guests", ["vgpu"])
        s.counter("gvtbench_msi_merged", "MSIs merged with one not yet delivered (the IRR bit was "
                  "set)", ["vgpu"])
        s.counter("gvtbench_trap_batches", "TRAP_WRITE batches sent to the mediator", ["vgpu"])
        s.counter("gvtbench_posted_writes", "Posted guest writes, by outcome", ["vgpu", "status"])
        s.gauge("gvtbench_hv_posted_writes_in_flight", "Posted writes of a VM queued or in flight", ["vgpu"])
        s.gauge("gvtbench_hv_pinned_pages", "Guest pages pinned by the mediator", ["vgpu"])
        s.gauge("gvtbench_hv_tracked_pages", "Guest pages write-protected for the mediator", ["vgpu"])
        s.counter("gvtbench_hv_tracked_writes", "Guest stores to tracked pages sent to the mediator",
                  ["vgpu"])
        s.counter("gvtbench_hv_vm_restarts", "Guests that came back as a new process: each VM "
                  "started again (vGPU reset, RAM and page tracking emptied)", ["vgpu"])
        s.counter("gvtbench_hv_vgpus_lost", "vGPUs lost with a mediator that restarted (their "
                  "guests were told: VGPU_LOST)", ["vgpu"])
        s.counter("gvtbench_hv_vm_resets", "VM resets a guest asked for (each a device-model reset "
                  "of its vGPU)", ["vgpu"])

    def accepting(self, vm_id: int) -> bool:
        """Whether the shell should read more from this VM's guest now: not while half its
        bound of posted writes waits (the rest of the bound absorbs what is already read)."""
        vm = self.vms.get(vm_id)
        return vm is None or vm.queued + vm.in_flight < self.max_posted // 2

    def _vm(self, vm_id: int) -> Vm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise GvtError("ENODEV", f"this hypervisor hosts no VM {vm_id}")
        return vm

    # ---- messages ------------------------------------------------------------------------------
    # ---- a guest that restarts ------------------------------------------------------------------------
    def peer_event(self, name: str, role: str, event: str, why: str, now: int) -> None:
        """A guest's new process (its link replaced by a later epoch) is a VM started again:
        the old one's queued writes go, its answers are not sent to the new one, its vGPU gets a
        device-model reset and its RAM and page tracking start empty, before any access of the
        new guest goes through."""
        if name == self.mediator and event in ("replaced", "restarted"):
            return self._vgpus_lost(f"the mediator {why}")
        if role != "guest" or event not in ("replaced", "restarted"):
            return
        vm = self.vms.get(int(name[5:]) if name[5:].isdigit() else -1)
        if vm is None:
            return
        vm.gen += 1
        vm.restarts += 1
        for item in vm.fifo:
            if isinstance(item, Event):
                self.emit(Signal(item))     # a held read: its guest is gone
        vm.fifo.clear()
        vm.faults_queued.clear()
        vm.queued = 0
        if vm.resetting is None:
            vm.resetting = Event(f"vm{vm.id} restart")
            self.emit(Spawn(self._vm_restarted(vm, why)))

    def _vgpus_lost(self, why: str) -> None:
        """The mediator restarted: every vGPU it had is gone, with the pins and page tracking
        it held. Each guest is told (VGPU_LOST); its accesses fail with ENODEV, and its queued
        writes as not applied, until it resets its VM, as a guest whose device vanished must."""
        for vm in self.vms.values():
            vm.device_lost = why
            self._forget_mediator_state(vm)
            self.stats.inc("gvtbench_hv_vgpus_lost", (vm.id,))
            self._dirty.add(vm.id)
            self.emit(Post(guest_name(vm.id), "VGPU_LOST", {"reason": why[:200]}, vgpu=vm.id))

    def _forget_mediator_state(self, vm: Vm) -> None:
        """The pins and page tracking a mediator held for the VM, gone with it (or with the VM)."""
        vm.pins[:] = 0
        vm.track[:] = 0
        vm.wp.bits[:] = 0
        self.stats.set("gvtbench_hv_tracked_pages", (vm.id,), 0)

    def restart_vms(self, why: str) -> Iterator[Any]:
        """A hypervisor that replaces one that died: every VM starts again (their guests died
        with it), each vGPU reset at the mediator, RAM and page tracking empty."""
        for vm in self.vms.values():
            vm.restarts += 1
            yield from self._vm_restarted(vm, why)
        return {"restarted_vms": sorted(self.vms)}

    def _vm_restarted(self, vm: Vm, why: str) -> Iterator[Any]:
        self.stats.inc("gvtbench_hv_vm_restarts", (vm.id,))
        try:
            while vm.batches or vm.faulting:        # the old guest's writes with the mediator
                yield Sleep(0.001)
            try:
                yield Call(self.mediator, "VGPU_RESET", None, vgpu=vm.id, timeout=self.call_timeout)
            except GvtError:
                pass            # no vGPU (yet): a mediator that restarted too starts it new
            self._forget_mediator_state(vm)     # what the reset did not release
            vm.mem.zero()
        finally:
            ev, vm.resetting = vm.resetting, None
            if ev is not None:
                yield Signal(ev)

    def _after_reset(self, vm: Vm, msg: Envelope) -> Iterator[Any]:
        while vm.resetting is not None:
            yield Wait(vm.resetting)
        res = self.handle(msg, (yield Now()))   # what it queues goes out with the next tick
        if isinstance(res, GeneratorType):
            res = yield from res
        return res

    def handle(self, msg: Envelope, now: int) -> Any:
        kind, p = msg.kind, msg.payload
        vm = self._vm(msg.vgpu)
        if vm.resetting is not None and msg.peer.startswith("guest"):
            return self._after_reset(vm, msg)
        if kind == "MMIO_WRITE":
            off = p["off"]
            return self._posted(vm, _U32.pack(off), bytes((p["size"],)), _U64.pack(p["val"]), 1,
                                int(bar0.in_gtt(off)), p.get("w", 0), now, msg.trace)
        if kind == "MMIO_WRITE_BATCH":
            n = write_batch_len(p)
            return self._posted(vm, p["off"], p["size"], p["val"], n, -1, p.get("w", 0), now,
                                msg.trace)
        if kind == "MMIO_READ":
            return self._read(vm, p["off"], p["size"])
        if kind == "VM_RESET":
            return self._vm_reset(vm)
        if kind == "GPA_READ":
            return self.gpa_read(vm, p["ops"])
        if kind == "GPA_WRITE":
            return self.gpa_write(vm, p["ops"])
        if kind == "GFN_PIN":
            return {"mfns": self.pin(vm, _u64s(p["gfns"])).tobytes()}
        if kind == "GFN_UNPIN":
            return self.unpin(vm, _u64s(p["gfns"]))
        if kind == "PAGE_TRACK":
            return self.page_track(vm, _u64s(p["gfns"]), p["enable"])
        if kind == "PAGE_FAULT":
            return self._fault(vm, p["gpa"], p["data"], p.get("w", 0), msg.trace)
        if kind == "RAM_WRITE":
            return self.ram_write(vm, p["ops"], msg.trace)
        if kind == "INJECT_MSI":
            # delivered at the end of this drain of the sockets: MSIs of one vector that come
            # before the vCPU could take the first merge, as the LAPIC's IRR bit does
            vm.msi_injected += 1
            self.stats.inc("gvtbench_msi_injected", (vm.id,))
            if vm.id in self._irqs:
                vm.msi_merged += 1
                self.stats.inc("gvtbench_msi_merged", (vm.id,))
            self._irqs[vm.id] = p.get("vector")
            if msg.trace and vm.id not in self._irq_traces:
                self._irq_traces[vm.id] = msg.trace
            return None
        raise GvtError("ENOTSUP", f"the hypervisor does not handle {kind}")

    def _posted(self, vm: Vm, offs: bytes, sizes: bytes, vals: bytes, n: int, n_gtt: int, w: int,
                now: int, trace: int = 0) -> None:
        if vm.queued + vm.in_flight + n > self.max_posted:
            self.stats.inc("gvtbench_posted_writes", (vm.id, "refused"), n)
            self.emit(self._done(vm, w, w, n, "failed",
                                          f"EAGAIN: VM {vm.id} has {vm.queued + vm.in_flight} posted "
                                          f"writes queued or in flight, the limit is {self.max_posted}",
                                          trace=trace))
            return None
        if n_gtt < 0:               # counted only once accepted: refusing must stay cheap
            n_gtt = int(np.count_nonzero(bar0.in_gtt(np.frombuffer(offs, dtype="<u4"))))
        tail = vm.fifo[-1] if vm.fifo else None
        if not isinstance(tail, _Writes) or len(tail) + n > self.batch_max:
            tail = _Writes(w)
            vm.fifo.append(tail)
        tail.off += offs
        tail.size += sizes
        tail.val += vals
        if tail.msgs and w != tail.last + 1:
            tail.in_order = False
        tail.last = w
        tail.arrivals.append((now, n - n_gtt, n_gtt))
        tail.msgs.append((w, n))
        if trace and not tail.trace:
            tail.trace = trace
        vm.queued += n
        self._dirty.add(vm.id)
        return None

    def _read(self, vm: Vm, off: int, size: int) -> Iterator[Any]:
        held = None
        if vm.fifo:                 # writes made before this read have not all gone out yet
            held = Event("read")
            vm.fifo.append(held)
            self.emit(*self._pump(vm))
        return self._trap_read(vm, off, size, held)

    def _vm_reset(self, vm: Vm) -> Iterator[Any]:
        """The VM resets itself (QEMU's device reset of the mdev: intel_vgpu_reset -> a device-
        model reset): in order after the writes the guest made before it, as a read is."""
        held = None
        if vm.fifo:
            held = Event("vm reset")
            vm.fifo.append(held)
            self.emit(*self._pump(vm))
        if held is not None:
            yield Wait(held)
        self.stats.inc("gvtbench_hv_vm_resets", (vm.id,))
        res = yield Call(self.mediator, "VGPU_RESET", None, vgpu=vm.id, timeout=self.call_timeout)
        vm.device_lost = None           # the new mediator's vGPU, reset: the VM has it now
        return res

    def _trap_read(self, vm: Vm, off: int, size: int, held: Event | None) -> Iterator[Any]:
        if held is not None:
            yield Wait(held)
        if vm.device_lost is not None:
            raise GvtError("ENODEV", f"VM {vm.id}'s vGPU is gone ({vm.device_lost}): reset the VM")
        return (yield Call(self.mediator, "TRAP_READ", {"off": off, "size": size}, vgpu=vm.id,
                           timeout=self.call_timeout))

    def _pump(self, vm: Vm) -> list[Any]:
        """Send what the VM's fifo may send now: batches while it has batches to spare, and the
        reads held behind writes that have gone."""
        out: list[Any] = []
        fifo = vm.fifo
        while fifo:
            if vm.faulting:
                break
            head = fifo[0]
            if isinstance(head, Event):
                fifo.popleft()
                out.append(Signal(head))
                continue
            if isinstance(head, _Fault):
                fifo.popleft()
                self._unqueue_fault(vm, head)
                if vm.track[head.gpa >> PAGE_SHIFT]:
                    vm.faulting = True
                    out.append(_traced(self._tracked_write(vm, head), head.trace, "forward", vm.id))
                else:                       # untracked meanwhile: a plain store
                    self._store(vm, head.gpa, head.data)
                    if head.w:
                        out.append(self._done(vm, head.w, head.w, 1, "ok", None, trace=head.trace))
                continue
            if vm.device_lost is not None:      # no vGPU to emulate them: not applied
                fifo.popleft()
                vm.queued -= len(head)
                out += self._dones(vm, head, "failed", f"ENODEV: the vGPU is gone ({vm.device_lost})")
                continue
            # a batch that is not full waits for the one in flight (and grows meanwhile); full
            # ones go while the VM has fewer than batches_in_flight out
            if vm.batches and (len(head) < self.batch_max or vm.batches >= self.batches_in_flight):
                break
            fifo.popleft()
            vm.queued -= len(head)
            vm.in_flight += len(head)
            vm.batches += 1
            out.append(_traced(self._write_batch(vm, head), head.trace, "forward", vm.id))
        if not fifo:
            self._dirty.discard(vm.id)
        return out

    # ---- page tracking -------------------------------------------------------------------------------
    def page_track(self, vm: Vm, gfns: np.ndarray, enable: bool) -> int:
        """Write-protect (or release) guest pages for the mediator; references are counted."""
        g = gfns.astype(np.int64)
        g = g[(g >= 0) & (g < vm.frames)]
        if enable:
            np.add.at(vm.track, g, 1)
        else:
            g = g[vm.track[g] > 0]
            np.subtract.at(vm.track, g, 1)
        vm.wp.bits[g] = vm.track[g] > 0
        self.stats.set("gvtbench_hv_tracked_pages", (vm.id,), int(np.count_nonzero(vm.track)))
        return len(g)

    def _fault(self, vm: Vm, gpa: int, data: bytes, w: int, trace: int = 0) -> None:
        """A guest store the guest's MMU stopped: it waits its turn in the fifo."""
        vm.gpa_to_mfn(gpa, len(data))
        if len(data) not in (1, 2, 4, 8) or gpa % len(data):
            raise GvtError("EINVAL", f"a faulting store is 1, 2, 4 or 8 aligned bytes, not "
                           f"{len(data)} at gpa {gpa:#x}")
        self._queue_fault(vm, _Fault(gpa, data, w, trace))
        return None

    def _queue_fault(self, vm: Vm, f: _Fault) -> None:
        g = f.gpa >> PAGE_SHIFT
        vm.faults_queued[g] = vm.faults_queued.get(g, 0) + 1
        vm.fifo.append(f)
        self._dirty.add(vm.id)

    def _unqueue_fault(self, vm: Vm, f: _Fault) -> None:
        g = f.gpa >> PAGE_SHIFT
        left = vm.faults_queued[g] - 1
        if left:
            vm.faults_queued[g] = left
        else:
            del vm.faults_queued[g]

    def ram_write(self, vm: Vm, ops: list, trace: int = 0) -> None:
        """Guest stores sent as messages (the msg fabric: the guest cannot map its RAM). A store
        to a tracked page, or to a page with a fault still queued (order), faults in 8-byte
        pieces; the rest is stored now."""
        for gpa, data in ops:
            vm.gpa_to_mfn(gpa, len(data))
        for gpa, data in ops:
            g = gpa >> PAGE_SHIFT
            if vm.track[g] or g in vm.faults_queued:
                for k in range(0, len(data), 8):
                    piece = data[k:k + 8]
                    if (gpa + k) % 8 or len(piece) not in (4, 8):
                        piece_ops = [(gpa + k + j, piece[j:j + 4]) for j in range(0, len(piece), 4)]
                    else:
                        piece_ops = [(gpa + k, piece)]
                    for a, d in piece_ops:
                        self._queue_fault(vm, _Fault(a, d, 0, trace))
            else:
                self._store(vm, gpa, data)
        return None

    def _store(self, vm: Vm, gpa: int, data: bytes) -> None:
        mfn, off = vm.gpa_to_mfn(gpa, len(data))
        vm.mem.write(mfn, off, data)

    def _tracked_write(self, vm: Vm, f: _Fault) -> Iterator[Any]:
        vm.tracked_writes += 1
        self.stats.inc("gvtbench_hv_tracked_writes", (vm.id,))
        gen = vm.gen
        status, reason, errors = "ok", None, None
        try:
            yield Call(self.mediator, "TRACKED_WRITE", {"gpa": f.gpa, "data": f.data}, vgpu=vm.id,
                       timeout=self.call_timeout)
        except OutcomeUnknown as err:
            status, reason = "unknown", str(err)
        except RemoteError as err:
            # the mediator refused to emulate it (its shadow keeps the old entry); the store
            # itself happens, as the vCPU's instruction completes either way
            status, reason, errors = "refused", str(err), [str(err)]
        except GvtError as err:
            status, reason = "failed", str(err)
        finally:
            if gen == vm.gen:
                self._store(vm, f.gpa, f.data)
            vm.faulting = False
            self._dirty.add(vm.id)
        if f.w and gen == vm.gen:
            try:
                yield self._done(vm, f.w, f.w, 1, status, reason, len(errors or ()), errors,
                                 refused=[0] if errors else None)
            except GvtError:
                pass

    def _write_batch(self, vm: Vm, q: _Writes) -> Iterator[Any]:
        self.stats.inc("gvtbench_trap_batches", (vm.id,))
        gen = vm.gen
        call = Call(self.mediator, "TRAP_WRITE", {"off": bytes(q.off), "size": bytes(q.size),
                                                  "val": bytes(q.val)},
                    vgpu=vm.id, timeout=self.call_timeout)
        n = len(q)
        try:
            res = yield call
            refused = res.get("refused") if res["n_errors"] else None
            done = self._dones(vm, q, "ok", None, res, refused)
            self._observe_writes(vm, q, call.done_at)
        except OutcomeUnknown as err:       # it may have been applied, or may be yet
            done = self._dones(vm, q, "unknown", str(err))
        except GvtError as err:             # refused, or never sent: not applied
            done = self._dones(vm, q, "failed", str(err))
        finally:
            vm.in_flight -= n
            vm.batches -= 1
            if vm.fifo:
                self._dirty.add(vm.id)
            self.stats.set("gvtbench_hv_posted_writes_in_flight", (vm.id,), vm.queued + vm.in_flight)
        if gen != vm.gen:
            return                          # its guest restarted: the new one did not ask
        try:
            for d in done:
                yield d
        except GvtError:
            pass                            # the guest has gone: nobody to tell

    def _dones(self, vm: Vm, q: _Writes, status: str, reason: str | None, res: dict | None = None,
               refused: bytes | None = None) -> list[Post]:
        """The WRITE_DONEs of a batch: one per run of its messages with consecutive numbers (a
        guest may number them out of order: each is answered exactly), and with refused writes
        (a bit per write from the mediator), one of its own, status refused, for each message that
        had any: it names those writes (their index in the message)."""
        bits = (np.unpackbits(np.frombuffer(refused, dtype=np.uint8), bitorder="little")
                if refused else None)
        n_errors = res["n_errors"] if res else 0
        errors = res["errors"] if res else None
        if bits is None and q.in_order and q.msgs:
            # the common case: one range, every message of it with the same outcome
            return [self._done(vm, q.msgs[0][0], q.last, len(q), status, reason, n_errors, errors)]
        out: list[Post] = []
        run: list[tuple[int, int]] = []     # messages not yet reported, consecutively numbered
        at = 0

        def flush() -> None:
            if run:
                out.append(self._done(vm, run[0][0], run[-1][0], sum(k for _w, k in run), status,
                                      reason, 0 if bits is not None else n_errors,
                                      None if bits is not None else errors))
                run.clear()
        for w, k in q.msgs:
            idx = np.flatnonzero(bits[at:at + k]).tolist() if bits is not None else []
            at += k
            if idx:
                flush()
                out.append(self._done(vm, w, w, k, "refused", f"the mediator refused {len(idx)} of "
                                      f"the message's {k} writes", len(idx), errors, refused=idx))
                continue
            if run and w != run[-1][0] + 1:
                flush()
            run.append((w, k))
        flush()
        return out

    def _done(self, vm: Vm, first: int, last: int, n: int, status: str, reason: str | None,
              n_errors: int = 0, errors: list[str] | None = None, trace: int | None = None,
              refused: list[int] | None = None) -> Post:
        self.stats.inc("gvtbench_posted_writes", (vm.id, status), n)
        p: dict[str, Any] = {"first": first, "last": last, "n": n, "status": status,
                             "n_errors": n_errors, "errors": list(errors or ())[:ERRORS_KEPT]}
        if reason:
            p["reason"] = reason
        if refused is not None:
            p["refused"] = refused
        return Post(guest_name(vm.id), "WRITE_DONE", p, vgpu=vm.id, trace=trace)

    def _observe_writes(self, vm: Vm, q: _Writes, end: int) -> None:
        """Each write's hypervisor stage: from its arrival to the mediator's answer."""
        for col, kind in ((1, "mmio_write"), (2, "gtt_write")):
            waits = [(end - a[0], a[col]) for a in q.arrivals if a[col]]
            if waits:
                lab = (vm.id, kind, "hypervisor")
                self.stats.hist(TRAP_LATENCY, lab).record_many([w for w, _ in waits], [n for _, n in waits])
                self.stats.inc(TRAPS, lab, sum(n for _, n in waits))

    OBSERVED = frozenset({"MMIO_READ"})

    def observe(self, msg: Envelope, result: Any, elapsed_ns: int) -> None:
        """A guest read answered: the hypervisor stage, measured by the shell."""
        if msg.kind == "MMIO_READ":
            kind = bar0.trap_kind(bar0.decode(msg.payload["off"], msg.payload["size"]), False)
            lab = (msg.vgpu, kind, "hypervisor")
            self.stats.hist(TRAP_LATENCY, lab).record(elapsed_ns)
            self.stats.inc(TRAPS, lab)

    def tick(self, now: int) -> None:
        out = self.outbox           # what tick sends goes after what was emitted before it
        if self._irqs:
            traces = self._irq_traces
            for vm_id, vector in self._irqs.items():
                out.append(Post(guest_name(vm_id), "IRQ", {} if vector is None else {"vector": vector},
                                vgpu=vm_id, trace=traces.get(vm_id, 0)))
            self._irqs = {}
            self._irq_traces = {}
        for vm_id in list(self._dirty):
            vm = self.vms[vm_id]
            out.extend(self._pump(vm))
            self.stats.set("gvtbench_hv_posted_writes_in_flight", (vm_id,), vm.queued + vm.in_flight)

    # ---- hypervisor calls ------------------------------------------------------------------------
    def pin(self, vm: Vm, gfns: np.ndarray) -> np.ndarray:
        """gfn -> mfn for each; 0 where the gfn is not guest RAM (that pin fails)."""
        gfns = gfns.astype(np.int64)
        ok = (gfns >= 0) & (gfns < vm.frames)
        mfns = np.zeros(len(gfns), dtype="<u8")
        good = gfns[ok]
        mfns[ok] = vm.p2m[good]
        np.add.at(vm.pins, good, 1)
        self.stats.set("gvtbench_hv_pinned_pages", (vm.id,), int(np.count_nonzero(vm.pins)))
        return mfns

    def unpin(self, vm: Vm, gfns: np.ndarray) -> int:
        gfns = gfns.astype(np.int64)
        good = gfns[(gfns >= 0) & (gfns < vm.frames)]
        good = good[vm.pins[good] > 0]
        np.subtract.at(vm.pins, good, 1)
        self.stats.set("gvtbench_hv_pinned_pages", (vm.id,), int(np.count_nonzero(vm.pins)))
        return len(good)

    def gpa_read(self, vm: Vm, ops: list) -> list[bytes]:
        check_reply_size(sum(n for _gpa, n in ops), len(ops), "GPA_READ")
        out = []
        for gpa, n in ops:
            mfn, off = vm.gpa_to_mfn(gpa, n)
            out.append(vm.mem.read(mfn, off, n))
        return out

    def gpa_write(self, vm: Vm, ops: list) -> int:
        checked = [(*vm.gpa_to_mfn(gpa, len(data)), data) for gpa, data in ops]
        for mfn, off, data in checked:      # all checked first: a bad op changes nothing
            vm.mem.write(mfn, off, data)
        return len(checked)

    def snapshot(self) -> dict:
        return {"vms": {vm.id: {"pinned": int(np.count_nonzero(vm.pins)), "msi": vm.msi_injected,
                                "posted": vm.queued + vm.in_flight, "msi_merged": vm.msi_merged,
                                "tracked_pages": int(np.count_nonzero(vm.track)),
                                "tracked_writes": vm.tracked_writes}
                        for vm in self.vms.values()}}


def _u64s(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<u8")


def _traced(task: Iterator[Any], trace: int, span: str, vm: int) -> Any:
    """A forwarding task, as a stage of the sampled operation it carries (if any)."""
    return Spawn(task, trace=trace, span=span, vgpu=vm) if trace else task
