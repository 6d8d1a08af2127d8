"""`gvtbench run --trace PATH`: the spans every node recorded for the sampled operations, as one
file in the Chrome trace-event JSON object format, which https://ui.perfetto.dev and
chrome://tracing open.

- A process (pid) per node, named by process_name metadata: the guests first, then the
  hypervisor, the mediator and the gpu.
- In each process, a track (tid) per vGPU, "vGPU N", and "host" for work of no vGPU (the gpu's
  engines, say). Viewers need the complete events of one track to nest, and the spans of a busy
  vGPU overlap, so such a vGPU gets more tracks: "vGPU N #2", ... (each holds spans that do not
  overlap).
- Each span is a complete event ("X"): ts and dur in microseconds since the earliest span, and
  in args the id of its operation.
- Each traced message whose two ends were both recorded is a flow of its own: "s" inside the
  sender's span at the send, "f" with "bp": "e" inside the receiver's span at the arrival. A
  span a node opened for its own reasons (a task, a send: not a message) is linked by a flow
  named "internal" from the span of the same operation that began last before it on that node:
  its cause there (a fifo, a queue, the core's state).

Timestamps are CLOCK_MONOTONIC, which all processes of one host share; nodes on other hosts
would need their clocks aligned first.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TRACE_RATE = 20.0       # sampled operations per second per guest when --trace-rate is not given
_ROLE_ORDER = {"hypervisor": 1, "mediator": 2, "gpu": 3}
_EDGE_NS = 1000                 # a flow event sits at least this far inside its span (or a quarter of it)


@dataclass
class NodeSpans:
    """What one node sent back: its spans as TRACE_DUMP gives them, and how many it dropped."""
    name: str
    os_pid: int
    spans: list[list] = field(default_factory=list)
    dropped: int = 0
    # how the node names its peers in its spans (those of its own GPU by their role) -> their ids
    peers: dict[str, str] = field(default_factory=dict)


def node_order(name: str) -> tuple[int, int]:
    """Guests first (by VM), then hypervisor, mediator, gpu: the path of an operation, top down."""
    if name.startswith("guest"):
        return (0, int(name[5:]))
    role, _sep, gpu = name.partition("/")         # a GPU's nodes in the order of the GPUs
    return (_ROLE_ORDER.get(role, 9), int(gpu) if gpu.isdigit() else 0)


def _inside(t: int, t0: int, t1: int) -> int:
    """`t` moved strictly inside [t0, t1] when the span is long enough: a viewer binds a flow
    event to the slice that encloses it, and an event at a slice's very edge may miss it."""
    m = min(_EDGE_NS, (t1 - t0) // 4)
    return min(max(t, t0 + m), t1 - m)


def _span_name(name: str, kind: str) -> str:
    return {"post": f"send {name}", "call": f"call {name}"}.get(kind, name)


def build(nodes: list[NodeSpans], meta: dict[str, Any]) -> dict[str, Any]:
    """The trace-event document of the nodes' spans (see the module doc)."""
    nodes = sorted(nodes, key=lambda n: node_order(n.name))
    starts = [s[0] for n in nodes for s in n.spans]
    base = min(starts) if starts else 0

    def us(t: int) -> float:
        return round((t - base) / 1000, 3)

    meta_events: list[dict] = []
    events: list[tuple] = []                # (pid, tid, ts, order, event): sorted per track
    placed: dict[tuple[int, int], tuple[int, int, list]] = {}   # (node, span) -> (pid, tid, span)
    for ni, node in enumerate(nodes):
        pid = ni + 1
        meta_events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                            "args": {"name": node.name}})
        meta_events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                            "args": {"sort_index": pid}})
        by_vgpu: dict[int, list[int]] = {}
        for si, s in enumerate(node.spans):
            by_vgpu.setdefault(s[2], []).append(si)
        tid = 0
        for vgpu in sorted(by_vgpu, key=lambda v: (v == 0, v)):
            label = f"vGPU {vgpu}" if vgpu else "host"
            lanes: list[int] = []           # the end of the last span on each of its tracks
            lane_tid: list[int] = []
            for si in sorted(by_vgpu[vgpu], key=lambda i: (node.spans[i][0], -node.spans[i][1])):
                t0, t1 = node.spans[si][0], node.spans[si][1]
                k = next((j for j, end in enumerate(lanes) if end <= t0), None)
                if k is None:
                    tid += 1
                    lanes.append(t1)
                    lane_tid.append(tid)
                    k = len(lanes) - 1
                    name = label if k == 0 else f"{label} #{k + 1}"
                    meta_events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                                        "args": {"name": name}})
                    meta_events.append({"name": "thread_sort_index", "ph": "M", "pid": pid,
                                        "tid": tid, "args": {"sort_index": tid}})
                else:
                    lanes[k] = t1
                placed[(ni, si)] = (pid, lane_tid[k], node.spans[si])
    for (ni, si), (pid, tid, s) in placed.items():
        t0, t1, vgpu, name, trace, kind = s[:6]
        events.append((pid, tid, t0, -(t1 - t0), {
            "name": _span_name(name, kind), "cat": "gvtbench", "ph": "X", "ts": us(t0),
            "dur": round((t1 - t0) / 1000, 3), "pid": pid, "tid": tid,
            "args": {"trace": f"{trace:#x}", "vm": trace >> 40, "node": nodes[ni].name}}))

    flows = 0

    def flow(src: tuple[int, int], t_src: int, dst: tuple[int, int], t_dst: int, name: str) -> None:
        nonlocal flows
        flows += 1
        fid = f"{flows:x}"
        for ref, t, ph in ((src, t_src, "s"), (dst, t_dst, "f")):
            pid, tid, s = placed[ref]
            at = _inside(t, s[0], s[1])
            ev = {"name": name, "cat": "flow", "ph": ph, "id": fid, "ts": us(at), "pid": pid,
                  "tid": tid}
            if ph == "f":
                ev["bp"] = "e"          # bind to the slice that encloses it, not the next one
            events.append((pid, tid, at, 1, ev))

    # both ends of each traced message: (sender, receiver, seq, trace) names one message
    sent: dict[tuple, tuple[tuple[int, int], int, str]] = {}
    for ni, node in enumerate(nodes):
        for si, s in enumerate(node.spans):
            for peer, seq, t, kind in s[7]:
                sent[(node.name, node.peers.get(peer, peer), seq, s[4])] = ((ni, si), t, kind)
    for ni, node in enumerate(nodes):
        for si, s in enumerate(node.spans):
            for peer, seq, t, _kind in s[6]:
                src = sent.get((node.peers.get(peer, peer), node.name, seq, s[4]))
                if src is not None:
                    flow(src[0], src[1], (ni, si), t, src[2])
    # spans a node opened itself: caused by the last span of the same operation before them there
    for ni, node in enumerate(nodes):
        by_trace: dict[int, list[int]] = {}
        for si, s in enumerate(node.spans):
            by_trace.setdefault(s[4], []).append(si)
        for sis in by_trace.values():
            sis.sort(key=lambda i: node.spans[i][0])
            for j, si in enumerate(sis):
                if node.spans[si][5] == "handle" or j == 0:
                    continue
                prev = sis[j - 1]
                t = node.spans[si][0]
                flow((ni, prev), t, (ni, si), t, "internal")

    events.sort(key=lambda e: e[:4])
    return {"traceEvents": meta_events + [e[4] for e in events], "displayTimeUnit": "ns",
            "metadata": {**meta, "t0_monotonic_ns": base, "flows": flows,
                         "nodes": {n.name: {"pid": n.os_pid, "spans": len(n.spans),
                                            "dropped": n.dropped} for n in nodes}}}


def write(path: str | os.PathLike, doc: dict[str, Any]) -> None:
    """Write the document whole or not at all (a run stopped while writing leaves no half file)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)


def summary(doc: dict[str, Any], path: str) -> dict[str, Any]:
    """What the result JSON says about the trace."""
    ev = doc["traceEvents"]
    nodes = doc["metadata"]["nodes"]
    return {"path": path, "spans": sum(1 for e in ev if e["ph"] == "X"),
            "flows": doc["metadata"]["flows"],
            "operations": len({e["args"]["trace"] for e in ev if e["ph"] == "X"}),
            "processes": sorted(n for n, v in nodes.items() if v["spans"]),
            "dropped": sum(v["dropped"] for v in nodes.values())}
