"""The run's system, from its config alone: which nodes there are, how they link, who owns which
memory, and which VM's vGPU sits on which physical GPU.

A physical GPU is served as in the kernel, one `intel_gvt` per device: each GPU G has its own
node ids gpu/G (the device), mediator/G (its GVT-g, with its own allocator, host pool,
scheduler and vGPUs) and hypervisor/G (the trap layer and RAM of the VMs on it). The VMs are
numbered across the run (guest<N>), and split over the GPUs in order, as evenly as they go.

Every node, the launcher and the tests derive the same facts from here: the peers a node
connects to and the roles it takes links from, the memory regions of each GPU's DMA space and
their owners, the names of the CURVE keys, and the endpoints the launcher has to hand out.
Where the nodes run (placement) is not here: bench.executor decides that.

Inside a node, the peers of its own GPU are named by their role ("gpu", "mediator",
"hypervisor"): the cores address their peers that way, and a node only ever links to its own
GPU's nodes. `local_name` and `qualify` turn one spelling into the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from nodes.errors import GvtError
from nodes.hw import MiB, PAGE_SIZE, partition
from nodes.memory import Layout
from nodes.wire.schema import (MAX_GPUS, STACK_ROLES, guest_name, hypervisor_index, local_hypervisor,
                               node_id, parse_node, split_node)

HOST_POOL_FRAMES = 4096         # 16 MiB: scratch page, shadow tables, contexts, rings, batches
POOL_FRAMES_PER_VGPU = 512      # past 7 vGPUs, the pool grows by 2 MiB per vGPU slot...


@dataclass(frozen=True)
class GpuStack:
    """One physical GPU and the nodes that serve it: its gpu, its mediator, and the
    hypervisors whose VMs have vGPUs on it (`hv_vms[K]`: hypervisor K's VMs)."""
    index: int
    vms: tuple[int, ...]
    hv_vms: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.hv_vms:
            object.__setattr__(self, "hv_vms", (self.vms,))

    @property
    def gpu(self) -> str:
        return node_id("gpu", self.index)

    @property
    def mediator(self) -> str:
        return node_id("mediator", self.index)

    @property
    def hypervisor(self) -> str:
        """The GPU's first hypervisor (its only one, unless gpu.hypervisors says more)."""
        return node_id("hypervisor", self.index)

    @property
    def hypervisors(self) -> list[str]:
        return [node_id("hypervisor", self.index, 0, k) for k in range(len(self.hv_vms))]

    def hypervisor_of(self, vm: int) -> str:
        """The id of the hypervisor that runs VM `vm`."""
        return node_id("hypervisor", self.index, 0, self.hv_index_of(vm))

    def hv_index_of(self, vm: int) -> int:
        for k, vms in enumerate(self.hv_vms):
            if vm in vms:
                return k
        raise GvtError("EINVAL", f"VM {vm} is not on GPU {self.index} (its VMs: "
                       f"{', '.join(map(str, self.vms))})")

    def vms_of(self, hypervisor: str) -> tuple[int, ...]:
        """The VMs of one of this GPU's hypervisors (by id)."""
        return self.hv_vms[hypervisor_index(hypervisor)]

    @property
    def nodes(self) -> list[str]:
        return [self.gpu, self.mediator, *self.hypervisors]


def host_pool_frames(cfg: dict) -> int:
    """A mediator's host pool: 16 MiB, or 2 MiB per vGPU it may hold, whichever is more, and
    never past the host's aperture share, where it is mapped (each vGPU's quota is its even share)."""
    want = max(HOST_POOL_FRAMES, POOL_FRAMES_PER_VGPU * cfg["mediator"]["max_vgpus"])
    return min(want, partition.HOST_LOW_GM // PAGE_SIZE)


def split_vms(count: int, gpus: int) -> list[tuple[int, ...]]:
    """VMs 1..count over `gpus` GPUs in order: the first GPUs take one more when it does not
    divide (7 over 3: 1-3, 4-5, 6-7)."""
    base, extra = divmod(count, gpus)
    out, nxt = [], 1
    for g in range(gpus):
        n = base + (1 if g < extra else 0)
        out.append(tuple(range(nxt, nxt + n)))
        nxt += n
    return out


class Topology:
    """The nodes, links and memory of a run (see the module's docstring)."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        count, gpus = cfg["vgpus"]["count"], cfg["gpu"]["count"]
        if not 1 <= gpus <= MAX_GPUS:
            raise GvtError("EINVAL", f"gpu.count must be 1..{MAX_GPUS}, got {gpus}")
        if gpus > count:
            raise GvtError("EINVAL", f"{gpus} GPUs for {count} vGPUs: every GPU needs a vGPU "
                           f"(gpu.count <= vgpus.count)")
        hvs = cfg["gpu"].get("hypervisors", 1)
        self.stacks = []
        for g, vms in enumerate(split_vms(count, gpus)):
            if hvs > len(vms):
                raise GvtError("EINVAL", f"gpu.hypervisors = {hvs}, but GPU {g} has {len(vms)} "
                               f"VMs: every hypervisor needs a VM")
            self.stacks.append(GpuStack(g, vms, tuple(tuple(vms[i - 1] for i in part)
                                                      for part in split_vms(len(vms), hvs))))
        self.vms = list(range(1, count + 1))
        self._gpu_of = {v: st.index for st in self.stacks for v in st.vms}

    # ---- nodes -----------------------------------------------------------------------------------
    def gpu_of(self, vm: int) -> int:
        try:
            return self._gpu_of[vm]
        except KeyError:
            raise GvtError("EINVAL", f"VM {vm} is not in this run (VMs 1..{len(self.vms)})") from None

    def stack(self, gpu: int) -> GpuStack:
        if not 0 <= gpu < len(self.stacks):
            raise GvtError("EINVAL", f"GPU {gpu} is not in this run (GPUs 0..{len(self.stacks) - 1}; "
                           f"gpu.count = {len(self.stacks)})")
        return self.stacks[gpu]

    def stack_of(self, name: str) -> GpuStack | None:
        """The GPU a node serves (a guest: its VM's); None for the launcher."""
        role, gpu, vm = parse_node(name)
        if role == "guest":
            return self.stack(self.gpu_of(vm))
        return None if gpu is None else self.stack(gpu)

    def node_ids(self) -> list[str]:
        """Every node of the run: each GPU's gpu, mediator and hypervisors, then the guests."""
        return [n for st in self.stacks for n in st.nodes] + [guest_name(v) for v in self.vms]

    def with_launcher(self) -> list[str]:
        return ["launcher", *self.node_ids()]

    # ---- links -----------------------------------------------------------------------------------
    def needed_peers(self, role: str) -> list[str]:
        """The roles a node of `role` connects to, on its own GPU (with the msg fabric the gpu
        does DMA by messages to region owners; it reaches the mediator over the link that one
        opened)."""
        if role == "gpu":
            return ["hypervisor"] if self.cfg["run"]["fabric"] == "msg" else []
        return {"mediator": ["gpu"], "hypervisor": ["mediator"], "guest": ["hypervisor"]}[role]

    def peers_of(self, name: str) -> list[str]:
        """The peers node `name` connects to, as it names them: needed_peers, with the gpu
        linked to each hypervisor of its GPU (`hypervisor`, `hypervisor.1`, ...)."""
        role = parse_node(name)[0]
        wanted = self.needed_peers(role)
        st = self.stack_of(name)
        if role == "gpu" and wanted and st is not None:
            return [local_hypervisor(k) for k in range(len(st.hv_vms))]
        return wanted

    def accepted_roles(self, role: str) -> frozenset[str]:
        """The roles that connect to `role` (with the shm fabric the gpu reaches guest RAM
        directly, so the hypervisor takes no gpu link, and with it no DMA_READ/DMA_WRITE)."""
        return frozenset(r for r in ("gpu", "mediator", "hypervisor", "guest")
                         if role in self.needed_peers(r)) | {"launcher"}

    def links(self) -> Iterator[tuple[str, str]]:
        """Every connection of the run, (the node that connects, the node it connects to)."""
        for n in self.node_ids():
            for peer in self.peers_of(n):
                yield n, self.qualify(n, peer)
            yield n, "launcher"

    @staticmethod
    def local_name(own: str, peer: str) -> str:
        """How node `own` names `peer` in its links: a node of its own GPU by its role (a
        hypervisor K >= 1 as hypervisor.K; a guest's own hypervisor is its `hypervisor`)."""
        own_role, own_gpu, own_vm = parse_node(own)
        role, gpu, _vm, hv = split_node(peer)
        if role in STACK_ROLES and own_gpu is None and own_vm == 0:
            return node_id(role, gpu or 0, 0, hv)   # the launcher names every node by its id
        if role == "hypervisor":
            return "hypervisor" if own_role == "guest" else local_hypervisor(hv)
        return role if role in STACK_ROLES else peer

    def qualify(self, own: str, peer: str) -> str:
        """The id of the node `own` calls `peer` (a role: the one of its own GPU; a guest's
        `hypervisor`: its VM's)."""
        role, gpu, vm, hv = split_node(peer)
        if role in STACK_ROLES and "/" not in peer:
            st = self.stack_of(own)
            own_role, _g, own_vm = parse_node(own)
            if role == "hypervisor" and own_role == "guest" and st is not None:
                return st.hypervisor_of(own_vm)
            return node_id(role, st.index if st else 0, 0, hv)
        return node_id(role, gpu or 0, vm, hv)

    # ---- memory ----------------------------------------------------------------------------------
    def layout(self, gpu: int) -> Layout:
        """GPU `gpu`'s DMA space: its mediator's host pool, then the RAM of its VMs. Each GPU has
        its own (as behind an IOMMU): a GPU reaches no other GPU's pool or VMs."""
        frames = self.cfg["vgpus"]["ram_mib"] * (MiB // PAGE_SIZE)
        st = self.stack(gpu)
        return Layout.build(host_pool_frames(self.cfg), {vm: frames for vm in st.vms},
                            hypervisor={vm: local_hypervisor(st.hv_index_of(vm)) for vm in st.vms},
                            gpu=gpu)

    def regions(self) -> dict[str, str]:
        """Every memory region of the run and the node that owns it (serves its DMA)."""
        out = {}
        for st in self.stacks:
            for r in self.layout(st.index).regions:
                out[r.name] = self.qualify(st.gpu, r.owner)
        return out

    # ---- endpoints -------------------------------------------------------------------------------
    def binders(self) -> dict[str, str | None]:
        """Every endpoint the launcher hands out, and the node that binds it (None: the launcher
        itself): each GPU's gpu, mediator and hypervisor, and the hypervisor's socket for each of
        its VMs (`hypervisor/G.vm<N>`). Guests bind nothing."""
        out: dict[str, str | None] = {"launcher": None}
        for st in self.stacks:
            out.update({n: n for n in st.nodes})
            out.update({vm_endpoint_name(st.hypervisor_of(v), v): st.hypervisor_of(v)
                        for v in st.vms})
        return out


def vm_endpoint_name(hypervisor: str, vm: int) -> str:
    return f"{hypervisor}.vm{vm}"
