"""A checker of Chrome trace-event JSON (the JSON object format), written from the format's rules
and from how the viewers read it, independent of the code that writes gvtbench's traces:

- the document: an object with a `traceEvents` list, `displayTimeUnit` "ms" or "ns", and, if
  present, a `metadata` object;
- every event: `ph`, `name`, `pid`, `tid`; every timed one a number `ts` >= 0; "X" a `dur` >= 0;
  flow events ("s", "t", "f") an `id` and a `cat`; metadata ("M") one of the names viewers
  know, with its `args`;
- per track (pid, tid), in file order: timestamps never go back; "B" and "E" match as a stack;
  complete events, taken in the order a viewer sorts them (ts, then the longer first), nest:
  none starts inside another and ends after it;
- every flow id has exactly one start and one end (steps in between), the same `cat` and `name`
  throughout (Perfetto keys a v1 flow by id, cat and name), in time order; each flow event binds
  to a slice of its own track that encloses its ts (what chrome://tracing does, and Perfetto for
  the open slice; "f" with "bp": "e" binds to the enclosing slice too).

`check(doc)` returns the problems found and the slices joined by flows (connected components),
so a test can say which processes one sampled operation crossed.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

TIMED = ("B", "E", "X", "i", "I", "s", "t", "f", "C")
FLOW = ("s", "t", "f")
METADATA = ("process_name", "process_labels", "process_sort_index", "thread_name",
            "thread_sort_index")


def _num(v: Any) -> bool:
    return type(v) in (int, float)


def check(doc: Any) -> tuple[list[str], list[set[tuple[int, int, int]]]]:
    """(problems, components): each component a set of slices (pid, tid, index of the slice on
    its track) joined by flows."""
    errs: list[str] = []
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["the document is not an object with a traceEvents list"], []
    if doc.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        errs.append(f"displayTimeUnit {doc['displayTimeUnit']!r} is neither 'ms' nor 'ns'")
    if "metadata" in doc and not isinstance(doc["metadata"], dict):
        errs.append("metadata is not an object")
    tracks: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for i, e in enumerate(doc["traceEvents"]):
        where = f"event {i}"
        if not isinstance(e, dict):
            errs.append(f"{where} is not an object")
            continue
        ph = e.get("ph")
        if not isinstance(ph, str) or not isinstance(e.get("name"), str):
            errs.append(f"{where} lacks ph or name")
            continue
        if type(e.get("pid")) is not int or type(e.get("tid")) is not int:
            errs.append(f"{where} ({ph} {e['name']!r}) lacks an integer pid and tid")
            continue
        if ph == "M":
            if e["name"] not in METADATA or not isinstance(e.get("args"), dict):
                errs.append(f"{where}: metadata {e['name']!r} is not one viewers know, or has no args")
            continue
        if ph not in TIMED:
            errs.append(f"{where}: phase {ph!r} is not one of {TIMED + ('M',)}")
            continue
        if not _num(e.get("ts")) or e["ts"] < 0:
            errs.append(f"{where} ({ph} {e['name']!r}) has no ts >= 0")
            continue
        if ph == "X" and (not _num(e.get("dur")) or e["dur"] < 0):
            errs.append(f"{where}: complete event {e['name']!r} has no dur >= 0")
            continue
        if ph in FLOW and (not isinstance(e.get("id"), (str, int)) or not isinstance(e.get("cat"), str)):
            errs.append(f"{where}: flow event {e['name']!r} lacks an id or a cat")
            continue
        tracks[(e["pid"], e["tid"])].append(e)

    slices: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for key, evs in tracks.items():
        last = None
        for e in evs:
            if last is not None and e["ts"] < last:
                errs.append(f"track {key}: ts goes back from {last} to {e['ts']} ({e['ph']} {e['name']!r})")
            last = e["ts"]
        spans: list[tuple[float, float]] = []
        stack: list[dict] = []
        for e in evs:
            if e["ph"] == "B":
                stack.append(e)
            elif e["ph"] == "E":
                if not stack:
                    errs.append(f"track {key}: E {e['name']!r} at {e['ts']} has no open B")
                    continue
                b = stack.pop()
                if e["name"] and b["name"] != e["name"]:
                    errs.append(f"track {key}: E {e['name']!r} closes B {b['name']!r}")
                spans.append((b["ts"], e["ts"]))
            elif e["ph"] == "X":
                spans.append((e["ts"], e["ts"] + e["dur"]))
        for b in stack:
            errs.append(f"track {key}: B {b['name']!r} at {b['ts']} is never closed")
        spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        open_: list[tuple[float, float]] = []
        for s in spans:
            while open_ and open_[-1][1] <= s[0]:
                open_.pop()
            if open_ and s[1] > open_[-1][1]:
                errs.append(f"track {key}: slice {s} starts inside {open_[-1]} and ends after it")
            open_.append(s)
        slices[key] = spans

    def bind(e: dict) -> tuple[int, int, int] | None:
        """The innermost slice of the event's track that encloses its ts."""
        key = (e["pid"], e["tid"])
        best = None
        for k, (a, b) in enumerate(slices.get(key, ())):
            if a <= e["ts"] <= b and (best is None or a >= slices[key][best][0]):
                best = k
        return None if best is None else (key[0], key[1], best)

    flows: dict[Any, list[dict]] = defaultdict(list)
    for evs in tracks.values():
        for e in evs:
            if e["ph"] in FLOW:
                flows[e["id"]].append(e)
    parent: dict[tuple[int, int, int], tuple[int, int, int]] = {}

    def root(x: tuple[int, int, int]) -> tuple[int, int, int]:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for fid, evs in flows.items():
        phases = [e["ph"] for e in evs]
        if phases.count("s") != 1 or phases.count("f") != 1:
            errs.append(f"flow {fid!r}: {phases.count('s')} starts and {phases.count('f')} ends "
                        f"(one of each wanted)")
            continue
        if len({(e["cat"], e["name"]) for e in evs}) != 1:
            errs.append(f"flow {fid!r}: its events differ in cat or name")
        order = sorted(evs, key=lambda e: (e["ts"], "stf".index(e["ph"])))
        if order[0]["ph"] != "s" or order[-1]["ph"] != "f":
            errs.append(f"flow {fid!r}: not in time order start, steps, end")
        bound = []
        for e in evs:
            b = bind(e)
            if b is None:
                errs.append(f"flow {fid!r}: its {e['ph']} at {e['ts']} on track "
                            f"{(e['pid'], e['tid'])} is inside no slice")
            else:
                bound.append(b)
        for b in bound[1:]:
            parent[root(b)] = root(bound[0])
    comps: dict[tuple[int, int, int], set] = defaultdict(set)
    for key, spans in slices.items():
        for k in range(len(spans)):
            s = (key[0], key[1], k)
            comps[root(s)].add(s)
    return errs, list(comps.values())


def process_names(doc: dict) -> dict[int, str]:
    return {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "process_name"}
