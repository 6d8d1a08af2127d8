"""One node process: a role's core inside the shared runtime, wired to its peers.

The same entry point serves the launcher (which passes every endpoint on the command line) and a
person starting one node alone on another host (`gvtbench node ROLE --bind ... --peer ...`).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from nodes import hw
from nodes.errors import GvtError
from nodes.memory import Fabric, Layout, OwnedMemory, RegionMemory
from nodes.runtime import Post, Runtime, Sleep, die_with_parent

ROLES = ("gpu", "mediator", "hypervisor", "guest")
HOST_POOL_FRAMES = 4096         # 16 MiB: scratch page, and later shadow tables and contexts
PROGRESS_EVERY_NS = 250_000_000


def build_layout(cfg: dict) -> Layout:
    frames = cfg["vgpus"]["ram_mib"] * (hw.MiB // hw.PAGE_SIZE)
    return Layout.build(HOST_POOL_FRAMES, {vm: frames for vm in vm_ids(cfg)})


def vm_ids(cfg: dict) -> list[int]:
    return list(range(1, cfg["vgpus"]["count"] + 1))


def needed_peers(role: str, cfg: dict) -> list[str]:
    if role == "gpu":
        # with the msg fabric the gpu does DMA by messages to region owners; the mediator is
        # reached over the link it opened to us
        return ["hypervisor"] if cfg["run"]["fabric"] == "msg" else []
    return {"mediator": ["gpu"], "hypervisor": ["mediator"], "guest": ["hypervisor"]}[role]


def select_translator(name: str):
    from nodes.mediator import translate as t
    if name == "auto":
        return t.translate_entries, t.TRANSLATOR
    return t.get_translator(name), name


class _GuestDriver:
    """Wraps the guest core to send progress to the launcher now and then."""

    def __init__(self, core: Any, launcher: str | None):
        self.core, self.launcher = core, launcher
        self.next_progress = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def tick(self, now: int) -> list[Any]:
        out = self.core.tick(now)
        if self.launcher and self.core.state == "running" and now >= self.next_progress:
            self.next_progress = now + PROGRESS_EVERY_NS
            out.append(Post(self.launcher, "PROGRESS", self.core.progress(), vgpu=self.core.vm))
        return out

    def next_wake(self, now: int) -> int | None:
        w = self.core.next_wake(now)
        if self.launcher and self.core.state == "running":
            w = min(w, self.next_progress) if w else self.next_progress
        return w


def run_node(role: str, cfg: dict, *, name: str | None, vm: int, bind: str, peers: dict[str, str],
             launcher: str | None, run_id: str, metrics_port: int = 0, metrics_addr: str = "127.0.0.1",
             parent_death: bool = False) -> int:
    if role not in ROLES:
        raise GvtError("EINVAL", f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    if parent_death:
        die_with_parent()
    clock = time.monotonic_ns
    layout = build_layout(cfg)
    seed = cfg["run"]["seed"]
    backend = cfg["run"]["fabric"]
    owned = OwnedMemory(layout)
    setup = None
    info: dict[str, Any] = {}
    if role == "gpu":
        from nodes.gpu.sim import GpuSim
        fabric = Fabric(layout, backend, run_id)
        core: Any = GpuSim(fabric, clock)
        name = name or "gpu"
    elif role == "mediator":
        from nodes.mediator.core import MediatorCore
        owned.add(RegionMemory.create(layout.host, backend, run_id))
        translate, tname = select_translator(cfg["mediator"]["translator"])
        core = MediatorCore(layout, owned, aperture_size=cfg["gpu"]["aperture_mib"] * hw.MiB,
                            max_vgpus=cfg["mediator"]["max_vgpus"], clock=clock, translate=translate)
        info["translator"] = tname
        setup = core.setup([(v, cfg["vgpus"]["type"]) for v in vm_ids(cfg)])
        name = name or "mediator"
    elif role == "hypervisor":
        from nodes.hypervisor.core import HypervisorCore
        mems = {}
        for v in vm_ids(cfg):
            rm = RegionMemory.create(layout.vm_region(v), backend, run_id)
            owned.add(rm)
            mems[v] = rm
        core = HypervisorCore(layout, owned, mems, seed, clock=clock)
        name = name or "hypervisor"
    else:
        from nodes.guest.core import GuestCore, LoadSpec
        if vm not in vm_ids(cfg):
            raise GvtError("EINVAL", f"guest --vm {vm} is not one of the configured VMs {vm_ids(cfg)}")
        ld = cfg["load"]
        spec = LoadSpec(mix=dict(ld["mix"]), mode=ld["mode"], rate=float(ld["rate"]),
                        concurrency=ld["concurrency"], window=ld["window"], burst=ld["burst"],
                        invalid_gfn_ratio=ld["invalid_gfn_ratio"], not_present_ratio=ld["not_present_ratio"],
                        outside_ratio=ld["outside_ratio"], duration_s=float(cfg["run"]["duration_s"]),
                        ops=cfg["run"]["ops"])
        name = name or f"guest{vm}"
        core = _GuestDriver(GuestCore(vm, layout.vm_region(vm).frames, seed, spec, clock=clock,
                                      launcher="launcher" if launcher else None), "launcher" if launcher else None)

    rt = Runtime(name, role, core, bind)
    rt.on_stop.append(owned.close)
    if role == "gpu":
        rt.on_stop.append(core.fabric.close)
    wanted = needed_peers(role, cfg)
    for p in wanted:
        if p not in peers:
            raise GvtError("EINVAL", f"{role} needs --peer {p}=ENDPOINT")
        rt.connect(p, peers[p])
    if launcher:
        rt.connect("launcher", launcher)
    port = rt.serve_metrics(metrics_addr, metrics_port)

    def startup():
        try:
            yield from rt.hello_task(wanted + (["launcher"] if launcher else []))
            result = (yield from setup) if setup is not None else None
        except Exception as err:
            text = getattr(err, "text", None) or str(err)
            print(f"gvtbench {name}: start-up failed: {text}", file=sys.stderr, flush=True)
            if launcher:
                yield Post("launcher", "READY", {"name": name, "error": text})
                yield Sleep(0.2)
            rt.stopping = True
            return
        if launcher:
            yield Post("launcher", "READY", {"name": name, "role": role, "endpoint": rt.endpoint,
                                             "metrics_port": port, "pid": os.getpid(),
                                             "setup": result, **info})
        elif role == "guest":
            rt.spawn(core.core.boot_and_start({"load": True}))

    rt.spawn(startup())
    try:
        rt.run()
    finally:
        rt.close()
    return 0
