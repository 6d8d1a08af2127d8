"""The simulated GPU's cost model: the virtual time each command takes, so a workload runs for a
stated time and a time slice can end while work is queued. An engine adds up the cost of what it
runs and is busy for that long (it sleeps it off every SLICE_NS of cost and before it posts the
context's completion): a context's completion comes its cost after its start, and the engine
takes nothing else meanwhile.

A 3DPRIMITIVE costs its vertex count times its instance count times `vertex_ns`: the one
command whose size the guest states, so a guest submits a workload of a given GPU time by
drawing that many vertices. A batch that chains to itself having done nothing (a spin) keeps
its engine busy until the engine is reset; the engine waits for that instead of running the
loop (as an emulator skips an idle loop): a workload that never ends.

The defaults are of the order of a gen9 command streamer's; `[gpu.cost]` in a config sets any
of them (ns, integers >= 0; all 0: a gpu that takes no time, as before this model).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from nodes.hw import cmd

SLICE_NS = 1_000_000            # an engine sleeps off its cost at least this often
SPIN_LOOK_S = 0.005             # a spinning engine looks for its reset this often


@dataclass(frozen=True)
class CostModel:
    command_ns: int = 20        # every command: fetched and decoded by the command streamer
    store_ns: int = 100         # MI_STORE_DATA_IMM, MI_STORE_REGISTER_MEM, a post-sync write
    atomic_ns: int = 200        # MI_ATOMIC: a read and a write
    batch_start_ns: int = 300   # MI_BATCH_BUFFER_START: the fetch of another buffer
    lri_ns: int = 30            # per register an MI_LOAD_REGISTER_IMM loads
    pipe_control_ns: int = 500  # PIPE_CONTROL: a pipeline flush
    vertex_ns: int = 2          # per vertex of a 3DPRIMITIVE (times its instances)

    @classmethod
    def from_config(cls, raw: dict | None) -> "CostModel":
        """From `[gpu.cost]`: unknown keys and values that are not integers >= 0 are refused."""
        raw = dict(raw or {})
        names = {f.name for f in fields(cls)}
        bad = sorted(set(raw) - names)
        if bad:
            raise ValueError(f"gpu.cost: unknown key {bad[0]!r} (known: {', '.join(sorted(names))})")
        for k, v in raw.items():
            if type(v) is not int or v < 0:
                raise ValueError(f"gpu.cost.{k} = {v!r}: an integer of ns >= 0")
        return cls(**raw)

    def table(self) -> dict[cmd.Cmd, int]:
        """Each command's own cost (3DPRIMITIVE's vertices and LRI's registers come on top)."""
        extra = {"MI_STORE_DATA_IMM": self.store_ns, "MI_STORE_REGISTER_MEM": self.store_ns,
                 "MI_ATOMIC": self.atomic_ns, "MI_BATCH_BUFFER_START": self.batch_start_ns,
                 "PIPE_CONTROL": self.pipe_control_ns}
        return {c: self.command_ns + extra.get(c.name, 0) for c in cmd.TABLE}

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
