"""Run configuration: TOML files in configs/, validated key by key.

Every error names the file, the key and the reason. Unknown keys are errors too: a typo must not
silently fall back to a default.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import tomllib

from nodes.gpu.cost import CostModel
from nodes.guest.core import MIXES
from nodes.mediator.sched_policy import GVT_SCHED_VGPU_PRI_TIME_NS, POLICIES
from nodes.mediator.scheduler import HOST_HANG_TIMEOUT_NS
from nodes.hw import partition, regs
from nodes.errors import GvtError
from nodes.node import fault_plan, guest_pools, node_names, vgpu_types
from nodes.topology import Topology
from nodes.wire.faults import FaultSpecError
from nodes.wire.schema import MAX_GPUS, MAX_HYPERVISORS, canonical, parse_node


class ConfigError(Exception):
    def __init__(self, where: str, key: str, reason: str):
        super().__init__(f"config {where}: {key}: {reason}")
        self.key, self.reason = key, reason


def _pos(v: Any) -> bool:
    return v > 0


def _nonneg(v: Any) -> bool:
    return v >= 0


def _cost_ok(v: Any) -> bool:
    try:
        CostModel.from_config(v)
    except ValueError:
        return False
    return True


def _ratio(v: Any) -> bool:
    return 0 <= v <= 1


# run.processes: where a GPU's nodes run, and the roles its one host process holds in each (none
# in split; the guests are apart in all)
HOST_ROLES: dict[str, tuple[str, ...]] = {"split": (), "host": ("mediator", "hypervisor"),
                                          "machine": ("gpu", "mediator", "hypervisor")}
PROCESS_LAYOUTS = tuple(HOST_ROLES)

# section -> key -> (types, default, check, what the check wants)
SCHEMA: dict[str, dict[str, tuple]] = {
    "run": {
        "duration_s": ((int, float), 10.0, _pos, "a number of seconds > 0"),
        "ops": (int, 0, _nonneg, "an op count per vGPU >= 0 (0: run for duration_s)"),
        "seed": (int, 1, _nonneg, "an integer >= 0"),
        "transport": (str, "ipc", lambda v: v in ("ipc", "tcp"), "'ipc' or 'tcp'"),
        "fabric": (str, "shm", lambda v: v in ("shm", "msg"), "'shm' or 'msg'"),
        "host": (str, "127.0.0.1", lambda v: bool(v), "a host address for tcp"),
        "processes": (str, "split", lambda v: v in PROCESS_LAYOUTS,
                      "'split' (every gpu, mediator and hypervisor its own process), 'host' "
                      "(each GPU's mediator and hypervisors share a process, as kvmgt and "
                      "GVT-g share the host kernel, and talk in memory) or 'machine' (its "
                      "simulated gpu too)"),
        "start_timeout_s": ((int, float), 60.0, _pos, "seconds > 0"),
        "drain_timeout_s": ((int, float), 60.0, _pos, "seconds > 0"),
        "call_timeout_s": ((int, float), 10.0, _pos,
                           "seconds > 0 a trapped access may take before its outcome is unknown"),
        "link_silent_s": ((int, float), 3.0, lambda v: v >= 1,
                          "seconds >= 1 a peer may be heard from not at all before its link "
                          "counts it dead (the link protocol's liveness timeout)"),
        "probe_reads": (int, 32, lambda v: 0 <= v <= 256,
                        "0..256 MMIO reads timed on one guest of each GPU before the load (the "
                        "unloaded latency a loaded p99 is compared with; 0: none)"),
        "trace_rate": ((int, float), 0.0, _nonneg,
                       "sampled operations per second per guest >= 0 (0: no tracing)"),
    },
    "gpu": {
        # the vfio backend (a real device) is not part of this version yet
        "backend": (str, "sim", lambda v: v == "sim", "'sim' (the only backend so far)"),
        "count": (int, 1, lambda v: 1 <= v <= MAX_GPUS, f"physical GPUs, 1..{MAX_GPUS}: each "
                  f"has its own gpu, mediator and hypervisor, and the VMs are split over them "
                  f"in order"),
        "hypervisors": (int, 1, lambda v: 1 <= v <= MAX_HYPERVISORS,
                        f"hypervisors serving each GPU's mediator, 1..{MAX_HYPERVISORS} (hypervisor/G, "
                        f"hypervisor/G.1, ...): the GPU's VMs are split over them in order"),
        "aperture_mib": (int, 1024, lambda v: v > partition.HOST_LOW_GM >> 20 and v < 4096,
                         f"MiB of CPU-mappable GM, more than the host's "
                         f"{partition.HOST_LOW_GM >> 20} and < 4096"),
        "fences": (int, partition.TOTAL_FENCES,
                   lambda v: partition.HOST_FENCES < v <= partition.MAX_SIM_FENCES,
                   f"fence registers, more than the host's {partition.HOST_FENCES} and at most "
                   f"{partition.MAX_SIM_FENCES} (Gen9 has {partition.TOTAL_FENCES}; a simulated "
                   f"GPU may have more)"),
        "cost": (dict, {}, _cost_ok, "a table of the simulated gpu's command costs in ns, "
                 "integers >= 0, of: " + ", ".join(CostModel().as_dict())),
    },
    "scheduler": {
        "policy": (str, "timeslice", lambda v: v in POLICIES,
                   "'timeslice' (GVT-g's: one vGPU owns the GPU at a time, shared by weight) or "
                   "'round_robin' (each engine serves the vGPUs in turn, weights ignored)"),
        "start_boost_ms": (int, GVT_SCHED_VGPU_PRI_TIME_NS // 1_000_000, _nonneg,
                           "ms >= 0 a newly scheduled vGPU goes first whatever its time slice "
                           "(the kernel's start-up boost, GVT_SCHED_VGPU_PRI_TIME; 0: none)"),
        "hang_timeout_ms": (int, HOST_HANG_TIMEOUT_NS // 1_000_000, _nonneg,
                            "ms >= 0 a workload may run on the GPU before the host resets its "
                            "engine (i915's heartbeat; 0: no host hang detection)"),
    },
    "mediator": {
        "max_vgpus": (int, partition.GVT_MAX_VGPU - 1, lambda v: 1 <= v <= 1024, "1..1024"),
        "translator": (str, "auto", lambda v: v in ("auto", "c", "python"), "'auto', 'c' or 'python'"),
        "scratch": (str, "kernel", lambda v: v in ("kernel", "fault"),
                    "'kernel' (the scratch tree is present and absorbs stray GPU accesses, as "
                    "GVT-g has it) or 'fault' (a stray access faults)"),
        "shadow_quota_pages": (int, 0, _nonneg, "host pool pages a vGPU may hold for its shadows, "
                               ">= 0 (0: an even share of the pool among max_vgpus)"),
    },
    "vgpus": {
        "count": (int, 2, lambda v: 1 <= v <= 1024, "1..1024"),
        "type": (str, "_8", None, "a vGPU type: upstream's (_8, _4, _2, _1) or one of [vgpu_types]"),
        "ram_mib": (int, 64, lambda v: 1 <= v <= 65536, "MiB of guest RAM, 1..65536"),
        "per_process": (int, 0, _nonneg, "guests run by one process (a pool), >= 0 (0: as many "
                        "processes as the machine has cores; 1: a process per guest)"),
        "types": (list, [], lambda v: all(isinstance(t, str) for t in v),
                  "a list of vGPU type names, one per vGPU; empty: every vGPU is of `type`"),
    },
    "load": {
        "mix": (dict, {"mmio-read": 0.4, "mmio-write": 0.4, "gtt-burst": 0.2}, None, ""),
        "mode": (str, "open", lambda v: v in ("open", "closed"), "'open' or 'closed'"),
        "rate": ((int, float), 2000.0, _pos, "ops/s per vGPU > 0"),
        "concurrency": (int, 8, _pos, "outstanding ops > 0"),
        "window": (int, 256, _pos, "ops in flight > 0"),
        "burst": (int, 256, lambda v: 1 <= v <= 65536, "GGTT entries per burst, 1..65536"),
        "invalid_gfn_ratio": ((int, float), 0.002, _ratio, "a ratio 0..1"),
        "not_present_ratio": ((int, float), 0.01, _ratio, "a ratio 0..1"),
        "outside_ratio": ((int, float), 0.05, _ratio, "a ratio 0..1"),
        "stores_per_batch": (int, 4, lambda v: 1 <= v <= 200, "MI_STORE_DATA_IMM per batch, 1..200"),
        "batches_per_workload": (int, 1, lambda v: 1 <= v <= 16, "batches per submission, 1..16"),
        "bad_ratio": ((int, float), 0.0, _ratio, "a ratio 0..1 of workloads meant to hang"),
        "spin_ratio": ((int, float), 0.0, _ratio, "a ratio 0..1 of workloads that never end (a "
                       "batch chained to itself: the host's hang detection resets the engine)"),
        "spin_vms": (list, [], lambda v: all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                             for x in v) and len(set(v)) == len(v),
                     "a list of distinct VM numbers >= 1 whose workloads spin_ratio applies to "
                     "(empty: every VM)"),
        "vertices": (int, 0, lambda v: 0 <= v <= 1 << 31, "vertices of a 3DPRIMITIVE in each "
                     "render batch, 0..2^31: GPU time per workload (times gpu.cost.vertex_ns)"),
        "engines": (list, ["rcs", "bcs"], lambda v: bool(v) and len(set(v)) == len(v) and
                    all(e in ("rcs", "bcs", "vcs", "vecs") for e in v),
                    "a list of distinct engines among rcs, bcs, vcs, vecs"),
        "hang_timeout_s": ((int, float), 6.0, _pos, "seconds > 0 without progress before the guest "
                           "resets an engine (i915's heartbeat: two 2.5 s intervals and the 0.64 s "
                           "preemption timeout)"),
        "churn_halves_ratio": ((int, float), 0.25, _ratio, "a ratio 0..1 of PTE writes made as two halves"),
        "hostile_vms": (list, [], lambda v: all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                for x in v) and len(set(v)) == len(v),
                        "a list of distinct VM numbers >= 1 that run the hostile mix (empty: every VM, "
                        "when the mix has a hostile weight)"),
        "hostile_repeat": (int, 2, lambda v: 1 <= v <= 100, "tries of each attack a vGPU survives, 1..100"),
        "hostile_timeout_s": ((int, float), 1.0, _pos, "seconds > 0 an accepted attack may take before "
                              "the guest calls it failed"),
    },
    "faults": {
        "seed": (int, -1, lambda v: v >= -1, "an integer >= 0 (-1: the run's seed)"),
        "links": (list, [], lambda v: all(isinstance(x, str) for x in v),
                  "a list of link fault specs (README: fault injection), for example "
                  "[\"drop=0.05\", \"partition=hypervisor-mediator@5s+1s\"]"),
    },
    "thresholds": {
        "mmio_read_p99_us": ((int, float), 0.0, _nonneg, "microseconds >= 0 (0: no threshold)"),
        "gtt_write_p99_us": ((int, float), 0.0, _nonneg, "microseconds >= 0 (0: no threshold)"),
        "min_ops_per_s": ((int, float), 0.0, _nonneg, "ops/s per vGPU >= 0 (0: no threshold)"),
        "max_read_p99_over_unloaded": ((int, float), 0.0, _nonneg,
                                       "a factor >= 0 an MMIO read p99 may be of the unloaded read "
                                       "latency (run.probe_reads; 0: no threshold)"),
        "min_achieved_ratio": ((int, float), 0.0, _ratio, "the share 0..1 of its offered rate a "
                               "vGPU's open-loop load must complete (0: no threshold)"),
    },
}


# [vgpu_types.NAME]: a type of the config's own, next to upstream's (key -> type, check, wants)
TYPE_KEYS: dict[str, tuple] = {
    "low_gm_mib": (int, lambda v: 1 <= v <= 2048, "MiB of aperture GM, 1..2048"),
    "high_gm_mib": (int, lambda v: 1 <= v <= 4096, "MiB of hidden GM, 1..4096"),
    "fences": (int, lambda v: 1 <= v <= regs.FENCE_SLOTS,
               f"fence registers, 1..{regs.FENCE_SLOTS} (what GVT-g traps for a vGPU)"),
    "weight": (int, lambda v: 1 <= v <= 256, "a scheduling weight, 1..256"),
}


def _vgpu_types(where: str, table: Any) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(where, "vgpu_types", "must be a table of types ([vgpu_types.NAME])")
    out = {}
    for name, t in table.items():
        key = f"vgpu_types.{name}"
        if name in partition.VGPU_TYPES:
            raise ConfigError(where, key, "is one of upstream's types; give yours another name")
        if not name or len(name) > 32 or not all(c.isalnum() or c in "_-" for c in name):
            raise ConfigError(where, key, "a type name is 1..32 letters, digits, '_' or '-'")
        if not isinstance(t, dict):
            raise ConfigError(where, key, "must be a table with " + ", ".join(TYPE_KEYS))
        for k in t:
            if k not in TYPE_KEYS:
                raise ConfigError(where, f"{key}.{k}", f"unknown key; known: {', '.join(TYPE_KEYS)}")
        for k, (typ, check, wants) in TYPE_KEYS.items():
            if k not in t:
                raise ConfigError(where, f"{key}.{k}", f"missing: {wants}")
            v = t[k]
            if isinstance(v, bool) or not isinstance(v, typ) or not check(v):
                raise ConfigError(where, f"{key}.{k}", f"must be {wants}, got {v!r}")
        out[name] = dict(t)
    return out


def _check_capacity(where: str, cfg: dict) -> None:
    """Every vGPU must fit on its GPU, by the allocator the mediator uses (the kernel's rule:
    aperture, hidden GM and fences), so a run that cannot start is refused here, naming why."""
    from nodes.mediator.aperture import GmAllocator
    types = vgpu_types(cfg)
    names = cfg["vgpus"]["types"] or [cfg["vgpus"]["type"]] * cfg["vgpus"]["count"]
    key = "vgpus.types" if cfg["vgpus"]["types"] else "vgpus.type"
    for t in names:
        if t not in types:
            raise ConfigError(where, key, f"unknown vGPU type {t!r}; known: {', '.join(types)}")
    for st in Topology(cfg).stacks:
        alloc = GmAllocator(cfg["gpu"]["aperture_mib"] * (1 << 20), fences=cfg["gpu"]["fences"],
                            types=types)
        for vm in st.vms:
            try:
                alloc.allocate(names[vm - 1])
            except GvtError as err:
                on = f"GPU {st.index} (VMs {st.vms[0]}-{st.vms[-1]})" \
                    if cfg["gpu"]["count"] > 1 else "the GPU"
                raise ConfigError(where, key, f"vGPU {vm} of {len(names)} does not fit on {on}: "
                                  f"{err.text} (gpu.aperture_mib = {cfg['gpu']['aperture_mib']}, "
                                  f"gpu.fences = {cfg['gpu']['fences']}; smaller types fit more: "
                                  f"[vgpu_types], and more GPUs: gpu.count)") from None



def defaults() -> dict:
    return {sec: {k: copy.deepcopy(spec[1]) for k, spec in keys.items()} for sec, keys in SCHEMA.items()}


def validate(raw: dict, where: str = "<config>") -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(where, "(top)", "must be a table")
    cfg = defaults()
    cfg["vgpu_types"] = {}
    for sec, table in raw.items():
        if sec == "vgpu_types":
            cfg["vgpu_types"] = _vgpu_types(where, table)
            continue
        if sec not in SCHEMA:
            raise ConfigError(where, sec, f"unknown section; known: {', '.join(SCHEMA)}, vgpu_types")
        if not isinstance(table, dict):
            raise ConfigError(where, sec, "must be a table")
        for key, val in table.items():
            spec = SCHEMA[sec].get(key)
            name = f"{sec}.{key}"
            if spec is None:
                raise ConfigError(where, name, f"unknown key; known in [{sec}]: {', '.join(SCHEMA[sec])}")
            types, _default, check, wants = spec
            if isinstance(val, bool) or not isinstance(val, types):
                raise ConfigError(where, name, f"must be {wants or _tname(types)}, got {val!r}")
            if check is not None and not check(val):
                raise ConfigError(where, name, f"must be {wants}, got {val!r}")
            cfg[sec][key] = val
    mix = cfg["load"]["mix"]
    for name, w in mix.items():
        if name not in MIXES:
            raise ConfigError(where, f"load.mix.{name}", f"unknown mix; known: {', '.join(MIXES)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ConfigError(where, f"load.mix.{name}", f"weight must be a number >= 0, got {w!r}")
    if not mix or sum(mix.values()) <= 0:
        raise ConfigError(where, "load.mix", "needs at least one mix with a weight > 0")
    types = cfg["vgpus"]["types"]
    if types and len(types) != cfg["vgpus"]["count"]:
        raise ConfigError(where, "vgpus.types", f"names {len(types)} types for "
                          f"{cfg['vgpus']['count']} vGPUs")
    stray = [v for v in cfg["load"]["hostile_vms"] if v > cfg["vgpus"]["count"]]
    if stray:
        raise ConfigError(where, "load.hostile_vms", f"VM {stray[0]} is not one of the "
                          f"{cfg['vgpus']['count']} VMs")
    if cfg["load"]["hostile_vms"] and not cfg["load"]["mix"].get("hostile", 0) > 0:
        raise ConfigError(where, "load.hostile_vms", "names hostile VMs, but load.mix gives "
                          "'hostile' no weight")
    try:
        plan = fault_plan(cfg)
    except FaultSpecError as err:
        raise ConfigError(where, "faults.links", err.text) from None
    if cfg["gpu"]["count"] > cfg["vgpus"]["count"]:
        raise ConfigError(where, "gpu.count", f"{cfg['gpu']['count']} GPUs for "
                          f"{cfg['vgpus']['count']} vGPUs: every GPU needs a vGPU")
    for nf in plan.nodes if plan else ():
        try:
            known = canonical(nf.node) in node_names(cfg)
        except GvtError:
            known = False
        if not known:
            raise ConfigError(where, "faults.links", f"{nf.kind}={nf.node}: no node {nf.node!r} in "
                              f"this run ({', '.join(node_names(cfg))})")
        layout = cfg["run"]["processes"]
        if parse_node(canonical(nf.node))[0] in HOST_ROLES[layout]:
            *most, last = HOST_ROLES[layout]
            raise ConfigError(where, "faults.links", f"{nf.kind}={nf.node}: with run.processes = "
                              f"'{layout}' a GPU's {', '.join(most)} and {last} nodes share one "
                              f"process, which cannot be stopped or killed for one of them; set "
                              f"run.processes = 'split'")
        if nf.node.startswith("guest") and max(map(len, guest_pools(cfg))) > 1:
            raise ConfigError(where, "faults.links", f"{nf.kind}={nf.node}: a guest in a pool of "
                              f"guests cannot be stopped or killed alone; set vgpus.per_process = 1")
    most = max(len(st.vms) for st in Topology(cfg).stacks)
    if most > cfg["mediator"]["max_vgpus"]:
        raise ConfigError(where, "vgpus.count", f"{cfg['vgpus']['count']} vGPUs" + (
            f" over {cfg['gpu']['count']} GPUs put {most} on one, which exceeds"
            if cfg["gpu"]["count"] > 1 else " exceed") +
            f" mediator.max_vgpus = {cfg['mediator']['max_vgpus']}")
    _check_capacity(where, cfg)
    return cfg


def _tname(types: Any) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


def default_config_path() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        p = base / "configs" / "smoke.toml"
        if p.is_file():
            return p
    raise ConfigError("smoke.toml", "(file)", "no configs/smoke.toml here or beside the package; "
                      "give a config path")


def load(path: str | os.PathLike | None = None) -> dict:
    p = Path(path) if path else default_config_path()
    where = p.name
    try:
        text = p.read_bytes()
    except OSError as err:
        raise ConfigError(str(p), "(file)", f"cannot read: {err.strerror}") from None
    try:
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(where, "(syntax)", str(err)) from None
    cfg = validate(raw, where)
    cfg["_source"] = str(p)
    return cfg


def apply_overrides(cfg: dict, *, duration: float | None = None, vgpus: int | None = None,
                    seed: int | None = None, ops: int | None = None,
                    trace_rate: float | None = None, faults: list[str] | None = None,
                    gpus: int | None = None, processes: str | None = None) -> dict:
    raw = {sec: copy.deepcopy(v) for sec, v in cfg.items() if not sec.startswith("_")}
    if processes is not None:
        raw["run"]["processes"] = processes
    if gpus is not None:
        raw["gpu"]["count"] = gpus
    if faults:
        raw["faults"]["links"] = list(raw["faults"]["links"]) + list(faults)
    if trace_rate is not None:
        raw["run"]["trace_rate"] = trace_rate
    if duration is not None:
        raw["run"]["duration_s"] = duration
    if vgpus is not None:
        raw["vgpus"]["count"] = vgpus
    if seed is not None:
        raw["run"]["seed"] = seed
    if ops is not None:
        raw["run"]["ops"] = ops
    out = validate(raw, "command line")
    out["_source"] = cfg.get("_source", "")
    return out


def public(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}
