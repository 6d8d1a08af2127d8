"""One node process: a role's core inside the shared runtime, wired to its peers.

The same entry point serves the launcher (which passes every endpoint on the command line) and a
person starting one node alone on another host (`gvtbench node ROLE --bind ... --peer ...`).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterator

from nodes.actions import Post, Sleep
from nodes.engine import TRACE_SPANS_MAX
from nodes.errors import GvtError
from nodes.hw import MiB, partition
from nodes.memory import Fabric, Layout, OwnedMemory, RegionMemory, WriteProtect, make_p2m
from nodes.metrics.export import BuildInfoCollector, PoolCollector, serve_metrics
from nodes.runtime import Keys, NodeHost, Runtime, die_with_parent
from nodes.topology import Topology, host_pool_frames  # noqa: F401 (bench takes it from here)
from nodes.wire.faults import FaultPlan
from nodes.wire.schema import guest_name, local_hypervisor, node_id

ROLES = ("gpu", "mediator", "hypervisor", "guest")
PROGRESS_EVERY_NS = 250_000_000     # per guest, up to 8 guests; then less often, so that the
PROGRESS_MAX_NS = 2_000_000_000     # launcher hears about 32 reports a second in all


def build_layout(cfg: dict, gpu: int = 0) -> Layout:
    """GPU `gpu`'s DMA space (Topology.layout)."""
    return Topology(cfg).layout(gpu)


def vgpu_types(cfg: dict) -> dict[str, partition.VgpuType]:
    """Upstream's vGPU types and the config's own ([vgpu_types.NAME])."""
    out = dict(partition.VGPU_TYPES)
    for name, t in cfg.get("vgpu_types", {}).items():
        out[name] = partition.VgpuType(t["low_gm_mib"] * MiB, t["high_gm_mib"] * MiB, t["fences"],
                                       t["weight"])
    return out


def fault_plan(cfg: dict) -> FaultPlan | None:
    """The run's link fault plan (None: no faults), from [faults] and the run's seed."""
    f = cfg["faults"]
    if not f["links"]:
        return None
    return FaultPlan.parse(f["seed"] if f["seed"] >= 0 else cfg["run"]["seed"], f["links"],
                           int(float(cfg["run"]["duration_s"]) * 1e9))


def vm_ids(cfg: dict) -> list[int]:
    return list(range(1, cfg["vgpus"]["count"] + 1))


def guest_pools(cfg: dict, vms: list[int] | None = None) -> list[list[int]]:
    """The guests' processes and the VMs each runs: vgpus.per_process guests a process, or (0)
    as many processes as the machine has cores, so that the guests spread over them."""
    vms = vm_ids(cfg) if vms is None else list(vms)
    per = cfg["vgpus"]["per_process"] or -(-len(vms) // max(1, os.cpu_count() or 1))
    return [vms[i:i + per] for i in range(0, len(vms), per)]


def vgpu_type(cfg: dict, vm: int) -> str:
    types = cfg["vgpus"].get("types") or []
    return types[vm - 1] if types else cfg["vgpus"]["type"]


def hostile_vms(cfg: dict) -> list[int]:
    """The VMs that run the hostile mix: those load.hostile_vms names, or every VM when it names
    none and the mix gives 'hostile' a weight."""
    if not cfg["load"]["mix"].get("hostile", 0) > 0:
        return []
    return list(cfg["load"]["hostile_vms"]) or vm_ids(cfg)


def guest_mix(cfg: dict, vm: int) -> dict[str, float]:
    """VM vm's load mix: the config's, without 'hostile' for a VM that does not attack."""
    mix = dict(cfg["load"]["mix"])
    if vm not in hostile_vms(cfg):
        mix.pop("hostile", None)
    return mix


def node_names(cfg: dict) -> list[str]:
    """Every node id of the run (Topology.node_ids)."""
    return Topology(cfg).node_ids()


def _vm_list(vms: list[int]) -> str:
    return f"{vms[0]}-{vms[-1]}" if len(vms) > 2 else ", ".join(map(str, vms)) or "none"


def vm_endpoint(bind: str, vm: int) -> str:
    """The endpoint a hypervisor binds for VM `vm`'s guest next to its main one: the ipc path
    with `.vm<N>`, or the tcp port + N. Each VM has its own socket so that the hypervisor can
    stop reading one guest (backpressure) and serve the VMs in turn."""
    if bind.startswith("tcp://"):
        host, _, port = bind[len("tcp://"):].rpartition(":")
        if not port.isdigit() or int(port) == 0:
            raise GvtError("EINVAL", f"the hypervisor's tcp endpoint {bind} needs a fixed port: "
                           f"guest N connects to that port + N (or give --vm-bind N=ENDPOINT)")
        return f"tcp://{host}:{int(port) + vm}"
    return f"{bind}.vm{vm}"


def needed_peers(role: str, cfg: dict) -> list[str]:
    """The roles a node of `role` connects to, on its own GPU (Topology.needed_peers)."""
    return Topology(cfg).needed_peers(role)


def accepted_roles(role: str, cfg: dict) -> frozenset[str]:
    return Topology(cfg).accepted_roles(role)


def select_translator(name: str) -> tuple[Any, str]:
    from nodes.mediator import translate as t
    if name == "auto":
        return t.translate_entries, t.TRANSLATOR
    return t.get_translator(name), name


def guest_core(cfg: dict, vm: int, run_id: str, launcher: str | None) -> tuple[Any, list[Any]]:
    """VM vm's guest core (which reports its progress to the launcher now and then), and what
    to close when it stops."""
    from nodes.guest.core import GuestCore, LoadSpec
    from nodes.guest.mmu import GuestRam
    run, ld = cfg["run"], cfg["load"]
    spec = LoadSpec(mix=guest_mix(cfg, vm), mode=ld["mode"], rate=float(ld["rate"]),
                    concurrency=ld["concurrency"], window=ld["window"], burst=ld["burst"],
                    invalid_gfn_ratio=ld["invalid_gfn_ratio"], not_present_ratio=ld["not_present_ratio"],
                    outside_ratio=ld["outside_ratio"], duration_s=float(run["duration_s"]),
                    ops=run["ops"], stores_per_batch=ld["stores_per_batch"],
                    batches_per_workload=ld["batches_per_workload"], bad_ratio=float(ld["bad_ratio"]),
                    spin_ratio=float(ld["spin_ratio"]) if not ld["spin_vms"] or vm in ld["spin_vms"]
                    else 0.0, vertices=ld["vertices"],
                    engines=tuple(ld["engines"]), hang_timeout_s=float(ld["hang_timeout_s"]),
                    churn_halves_ratio=float(ld["churn_halves_ratio"]),
                    trace_rate=float(run["trace_rate"]), hostile_repeat=ld["hostile_repeat"],
                    hostile_timeout_s=float(ld["hostile_timeout_s"]))
    ctl = "launcher" if launcher else None
    topo = Topology(cfg)
    region = topo.layout(topo.gpu_of(vm)).vm_region(vm)
    attach = None
    if run["fabric"] == "shm":
        # the guest's CPU reaches its RAM directly, and sees the hypervisor's write protection
        def attach() -> tuple:
            return (RegionMemory.attach(region, run_id), make_p2m(region, run["seed"]),
                    WriteProtect.attach(region, run_id))
    ram = GuestRam(vm, region.frames, "hypervisor", attach=attach)
    every = min(PROGRESS_MAX_NS, PROGRESS_EVERY_NS * max(1, cfg["vgpus"]["count"] // 8))
    core = GuestCore(vm, region.frames, run["seed"], spec, launcher=ctl, ram=ram,
                     progress_every_ns=every)
    return core, [ram.close]


def _runtime(name: str, role: str, core: Any, cfg: dict, bind: str | None, keys_dir: str | None,
             host: NodeHost | None = None, vm_binds: dict[int, str] | None = None,
             vms: list[int] | None = None) -> Runtime:
    run = cfg["run"]
    # every node of a traced run records spans; the guests decide which operations are traced
    return Runtime(name, role, core, bind, vgpus=vm_ids(cfg) if vms is None else vms,
                   vm_binds=vm_binds,
                   keys=Keys.load(keys_dir, name) if keys_dir else None,
                   link_silent_s=run["link_silent_s"], faults=fault_plan(cfg),
                   accepts=accepted_roles(role, cfg),
                   trace_spans=TRACE_SPANS_MAX if run["trace_rate"] > 0 else 0, host=host)


def _startup(rt: Runtime, wanted: list[str], launcher: str | None, setup: Iterator[Any] | None,
             ready: dict[str, Any]) -> Iterator[Any]:
    """HELLO to every peer, the core's set-up, then READY to the launcher (or, with no launcher,
    a guest boots and starts its load)."""
    try:
        yield from rt.hello_task(wanted + (["launcher"] if launcher else []))
        result = (yield from setup) if setup is not None else None
    except Exception as err:
        text = getattr(err, "text", None) or str(err)
        print(f"gvtbench {rt.name}: start-up failed: {text}", file=sys.stderr, flush=True)
        if launcher:
            yield Post("launcher", "READY", {"name": rt.name, "error": text})
            yield Sleep(0.2)
        rt.stopping = True
        return
    if launcher:
        yield Post("launcher", "READY", {"name": rt.name, "role": rt.role, "endpoint": rt.endpoint,
                                         "pid": os.getpid(), "setup": result, **ready})
    elif rt.role == "guest":
        rt.spawn(rt.core.boot_and_start(True, None))


def run_node(role: str, cfg: dict, *, vms: list[int], bind: str | None, peers: dict[str, str],
             launcher: str | None, run_id: str, keys_dir: str | None = None, metrics_port: int = 0,
             metrics_addr: str = "127.0.0.1", parent_death: bool = False,
             vm_binds: dict[int, str] | None = None, restarted: bool = False,
             vm_peers: dict[int, str] | None = None, gpu: int = 0, hv: int = 0) -> int:
    """Run one node (of GPU `gpu`; a hypervisor: its GPU's hypervisor `hv`), or (role guest,
    several VMs) a pool of guests in this process."""
    if role not in ROLES:
        raise GvtError("EINVAL", f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    tcp = (bind or "").startswith("tcp://") or any(
        ep.startswith("tcp://") for ep in [*peers.values(), *(vm_peers or {}).values()])
    if tcp and not keys_dir:
        raise GvtError("EPERM", "tcp links are authenticated with CURVE keys: pass --keys DIR "
                       "(make the keys of a run with `gvtbench keys DIR --config ...`)")
    if role == "guest":
        if bind:
            raise GvtError("EINVAL", "a guest binds nothing (no role connects to a guest; it "
                           "connects to its VM's endpoint of the hypervisor): drop --bind")
        return _run_guests(cfg, vms, peers=peers, vm_peers=vm_peers or {}, launcher=launcher,
                           run_id=run_id, keys_dir=keys_dir, metrics_port=metrics_port,
                           metrics_addr=metrics_addr, parent_death=parent_death)
    if vms or vm_peers:
        raise GvtError("EINVAL", "--vm and --vm-peer are for guests")
    if hv and role != "hypervisor":
        raise GvtError("EINVAL", "--hypervisor is for the hypervisor")
    if not bind:
        raise GvtError("EINVAL", f"a {role} needs --bind ENDPOINT")
    if role != "hypervisor" and vm_binds:
        raise GvtError("EINVAL", "--vm-bind is for the hypervisor")
    _check_hypervisor(cfg, gpu, hv)
    if parent_death:
        die_with_parent()
    rt, wanted, setup, info = _stack_node(role, cfg, gpu=gpu, hv=hv, bind=bind, peers=peers,
                                          launcher=launcher, run_id=run_id, keys_dir=keys_dir,
                                          vm_binds=vm_binds, restarted=restarted)
    port = rt.serve_metrics(metrics_addr, metrics_port, translator=info.get("translator", ""))
    rt.spawn(_startup(rt, wanted, launcher, setup, {"metrics_port": port, **info}))
    try:
        rt.run()
    finally:
        rt.close()
    return 0


def _check_hypervisor(cfg: dict, gpu: int, hv: int) -> None:
    stack = Topology(cfg).stack(gpu)
    if not 0 <= hv < len(stack.hv_vms):
        raise GvtError("EINVAL", f"GPU {gpu} has {len(stack.hv_vms)} hypervisor(s) "
                       f"(gpu.hypervisors): there is no hypervisor {hv}")


def run_host(cfg: dict, *, gpu: int, bind: str | None, hv_binds: dict[int, str],
             peers: dict[str, str], vm_binds: dict[int, str] | None, launcher: str | None,
             run_id: str, keys_dir: str | None = None, metrics_port: int = 0,
             metrics_addr: str = "127.0.0.1", parent_death: bool = False,
             gpu_bind: str | None = None) -> int:
    """GPU `gpu`'s host process (run.processes = "host"): its mediator and its hypervisors in
    one process, as kvmgt's trap handlers and GVT-g share the host kernel; with `gpu_bind`
    ("machine") its gpu too. Each is still its own node, with its own endpoints, links, metrics
    and READY; the links between them are in memory (Runtime._connect_local)."""
    if not bind:
        raise GvtError("EINVAL", "a host process needs --bind ENDPOINT (its mediator's)")
    stack = Topology(cfg).stack(gpu)
    if sorted(hv_binds) != list(range(len(stack.hv_vms))):
        raise GvtError("EINVAL", f"GPU {gpu}'s host process needs --hypervisor-bind K=ENDPOINT for "
                       f"each of its {len(stack.hv_vms)} hypervisor(s) (K from 0), got "
                       f"{sorted(hv_binds) or 'none'}")
    if gpu_bind:
        if peers:
            raise GvtError("EINVAL", "a host process that runs its gpu (--gpu-bind) has no peer: "
                           "drop --peer")
        peers = {"gpu": gpu_bind}
    elif "gpu" not in peers or peers.keys() - {"gpu"}:
        raise GvtError("EINVAL", "a host process's one peer is its gpu: --peer gpu=ENDPOINT")
    stray = sorted(set(vm_binds or {}) - set(stack.vms))
    if stray:
        raise GvtError("EINVAL", f"--vm-bind for VM {stray[0]}, which is not on GPU {gpu}")
    if parent_death:
        die_with_parent()
    host = NodeHost()
    nodes = []
    later: list[Any] = []
    if gpu_bind:        # the simulated GPU too (run.processes = 'machine')
        nodes.append(_stack_node("gpu", cfg, gpu=gpu, hv=0, bind=gpu_bind,
                                 peers={local_hypervisor(k): ep for k, ep in hv_binds.items()},
                                 launcher=launcher, run_id=run_id, keys_dir=keys_dir,
                                 vm_binds=None, restarted=False, host=host, later=later))
    nodes += [_stack_node("mediator", cfg, gpu=gpu, hv=0, bind=bind, peers=dict(peers),
                         launcher=launcher, run_id=run_id, keys_dir=keys_dir, vm_binds=None,
                         restarted=False, host=host, later=later)]
    for k, ep in sorted(hv_binds.items()):
        mine = {v: e for v, e in (vm_binds or {}).items() if v in stack.hv_vms[k]}
        nodes.append(_stack_node("hypervisor", cfg, gpu=gpu, hv=k, bind=ep,
                                 peers={"mediator": bind, **peers}, launcher=launcher,
                                 run_id=run_id, keys_dir=keys_dir, vm_binds=mine, restarted=False,
                                 host=host, later=later))
    for connect in later:
        connect()
    for i, (rt, wanted, setup, info) in enumerate(nodes):
        port = rt.serve_metrics(metrics_addr, metrics_port if i == 0 else 0,
                                translator=info.get("translator", ""))
        rt.spawn(_startup(rt, wanted, launcher, setup, {"metrics_port": port, **info}))
    try:
        host.run()
    finally:
        for rt, *_ in nodes:
            rt.close()
    return 0


def _stack_node(role: str, cfg: dict, *, gpu: int, hv: int, bind: str, peers: dict[str, str],
                launcher: str | None, run_id: str, keys_dir: str | None,
                vm_binds: dict[int, str] | None, restarted: bool, host: NodeHost | None = None,
                later: list[Any] | None = None
                ) -> tuple[Runtime, list[str], Iterator[Any] | None, dict[str, Any]]:
    """One gpu, mediator or hypervisor node (of GPU `gpu`; a hypervisor: its GPU's `hv`), on
    `host` (None: a process of its own), linked to its peers: its runtime, the peers it says
    HELLO to, its core's set-up and what its READY adds. On a shared host its connections are
    made by the calls it appends to `later`, once all the process's nodes have bound theirs, so
    that each link between them is in memory whichever binds first."""
    topo = Topology(cfg)
    stack = topo.stack(gpu)
    mine = list(stack.vms)          # the VMs whose vGPUs are on this GPU
    if role == "hypervisor":
        mine = list(stack.hv_vms[hv])       # the VMs this hypervisor runs
    name = node_id(role, gpu, 0, hv)
    run = cfg["run"]
    layout = topo.layout(gpu)
    owned = OwnedMemory(layout)
    setup: Iterator[Any] | None = None
    info: dict[str, Any] = {}
    on_stop: list[Any] = []
    core: Any
    if role == "gpu":
        from nodes.gpu.sim import GpuSim
        from nodes.gpu.cost import CostModel
        core = GpuSim(Fabric(layout, run["fabric"], run_id),
                      cost=CostModel.from_config(cfg["gpu"].get("cost")))
        on_stop.append(core.fabric.close)
    elif role == "mediator":
        from nodes.mediator.core import MediatorCore
        owned.add(RegionMemory.create(layout.host, run["fabric"], run_id))
        translate, info["translator"] = select_translator(cfg["mediator"]["translator"])
        core = MediatorCore(layout, Fabric(layout, run["fabric"], run_id, owned=owned),
                            hypervisors={v: local_hypervisor(stack.hv_index_of(v)) for v in mine},
                            aperture_size=cfg["gpu"]["aperture_mib"] * MiB,
                            max_vgpus=cfg["mediator"]["max_vgpus"], translate=translate,
                            scratch=cfg["mediator"]["scratch"],
                            shadow_quota=cfg["mediator"]["shadow_quota_pages"],
                            fences=cfg["gpu"]["fences"], types=vgpu_types(cfg),
                            sched_policy=cfg["scheduler"]["policy"],
                            start_boost_ns=cfg["scheduler"]["start_boost_ms"] * 1_000_000,
                            hang_timeout_ns=cfg["scheduler"]["hang_timeout_ms"] * 1_000_000)
        setup = core.setup([(v, vgpu_type(cfg, v)) for v in mine])
    else:
        from nodes.hypervisor.core import HypervisorCore
        mems, wps = {}, {}
        for v in mine:
            mems[v] = RegionMemory.create(layout.vm_region(v), run["fabric"], run_id)
            owned.add(mems[v])
            wps[v] = WriteProtect.create(layout.vm_region(v), run["fabric"], run_id)
        core = HypervisorCore(layout, mems, run["seed"], wps=wps, call_timeout=run["call_timeout_s"],
                              restarted=restarted)
        if restarted:
            # the VMs of the hypervisor that died are gone: each starts again, its vGPU reset
            # once the gpu runs nothing of it, before its guest's first access goes through
            setup = core.restart_vms("the hypervisor restarted")
        for wp in wps.values():
            on_stop.append(wp.close)
        stray = sorted(set(vm_binds or {}) - set(mine))
        if stray:
            raise GvtError("EINVAL", f"--vm-bind for VM {stray[0]}, which is not one of "
                           f"{name}'s VMs ({_vm_list(mine)})")
        vm_binds = {v: (vm_binds or {}).get(v) or vm_endpoint(bind, v) for v in mine}
    rt = _runtime(name, role, core, cfg, bind, keys_dir, host=host, vm_binds=vm_binds, vms=mine)
    if owned.mem:
        rt.engine.serve(OwnedMemory.KINDS, owned.serve)
    rt.on_stop.append(owned.close)
    rt.on_stop.extend(on_stop)
    wanted = topo.peers_of(name)
    for p in wanted:
        if p not in peers:
            raise GvtError("EINVAL", f"{role} needs --peer {p}=ENDPOINT")

    def connect() -> None:
        for p in wanted:
            rt.connect(p, peers[p])
        if launcher:
            rt.connect("launcher", launcher, control=True)
    if later is None:
        connect()
    else:
        later.append(connect)       # once every node of the process has bound its endpoints
    return rt, wanted, setup, info


def _run_guests(cfg: dict, vms: list[int], *, peers: dict[str, str], vm_peers: dict[int, str],
                launcher: str | None, run_id: str, keys_dir: str | None, metrics_port: int,
                metrics_addr: str, parent_death: bool) -> int:
    """One guest per VM of `vms`, all in this process (a pool): each its own node, with its own
    links to its VM's endpoint of the hypervisor and to the launcher, on one NodeHost; one
    /metrics for all, each sample labelled with its guest."""
    if not vms:
        raise GvtError("EINVAL", "a guest needs --vm N (several: a pool of guests)")
    stray = [v for v in vms if v not in vm_ids(cfg)]
    if stray:
        raise GvtError("EINVAL", f"guest --vm {stray[0]} is not one of the configured VMs {vm_ids(cfg)}")
    if len(set(vms)) != len(vms):
        raise GvtError("EINVAL", f"--vm names a VM twice: {vms}")
    if peers.keys() - {"hypervisor"}:
        raise GvtError("EINVAL", f"a guest's only peer is the hypervisor, not {sorted(peers)[0]}")
    eps = dict(vm_peers)
    if "hypervisor" in peers:
        if len(vms) > 1:
            raise GvtError("EINVAL", "a pool of guests needs --vm-peer N=ENDPOINT for each VM, "
                           "not one --peer hypervisor=")
        eps.setdefault(vms[0], peers["hypervisor"])
    missing = [v for v in vms if v not in eps]
    if missing:
        raise GvtError("EINVAL", f"guest VM {missing[0]} needs its hypervisor endpoint: "
                       f"--vm-peer {missing[0]}=ENDPOINT (or --peer hypervisor=ENDPOINT for one VM)")
    if parent_death:
        die_with_parent()
    host = NodeHost()
    topo = Topology(cfg)
    rts = []
    for vm in vms:
        core, on_stop = guest_core(cfg, vm, run_id, launcher)
        rt = _runtime(guest_name(vm), "guest", core, cfg, None, keys_dir, host=host, vms=[vm])
        rt.on_stop.extend(on_stop)
        # its VM's hypervisor: the one of the GPU its vGPU is on
        rt.connect("hypervisor", eps[vm], node=topo.stack(topo.gpu_of(vm)).hypervisor_of(vm))
        if launcher:
            rt.connect("launcher", launcher, control=True)
        rts.append(rt)
    server, port = serve_metrics([PoolCollector([(rt.name, rt.collectors()) for rt in rts]),
                                  BuildInfoCollector()], metrics_addr, metrics_port)
    pool = f"guests/{vms[0]}"          # the process, named by its first VM
    for i, rt in enumerate(rts):
        # the pool's one /metrics is announced once: one scrape target per process
        ready = {"pool": pool, "pool_vms": vms, "metrics_port": port if i == 0 else 0}
        rt.spawn(_startup(rt, ["hypervisor"], launcher, None, ready))
    try:
        host.run()
    finally:
        server.shutdown()
        server.server_close()
        for rt in rts:
            rt.close()
    return 0
