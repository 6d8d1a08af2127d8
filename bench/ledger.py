"""The checks that give a run its verdict: pure functions over what the nodes reported."""
from __future__ import annotations

from typing import Any

import numpy as np

from nodes.hw import PAGE_SHIFT, bar0, gtt
from nodes.memory import Layout, make_p2m
from nodes.metrics import TRAP_LATENCY, WORKLOAD_LATENCY
from nodes.stats import hist_from_snapshot

U64 = np.uint64


def expected_host_entries(vals: np.ndarray, p2m: np.ndarray, scratch_mfn: int) -> np.ndarray:
    """What the kernel's emulate_ggtt_mmio_write makes of these guest entries, computed from the
    p2m without the mediator's code: present + RAM gfn -> the guest entry with the machine
    frame; present + bad gfn -> the guest entry with the scratch frame (still present); not
    present -> the scratch frame alone (the host entry is built from zero)."""
    addr = U64(gtt.ADDR_MASK)
    present = gtt.present(vals)
    gfn = gtt.frame_of(vals).astype(np.int64)
    ram = present & (gfn < len(p2m))
    frame = np.full(len(vals), scratch_mfn, dtype=U64)
    frame[ram] = p2m[gfn[ram]]
    flags = np.where(present, vals & ~addr, U64(0))
    return flags | ((frame << U64(PAGE_SHIFT)) & addr)


def check_ggtt(dump: np.ndarray, vgpus: list[dict], guest_maps: dict[int, tuple[np.ndarray, np.ndarray]],
               layout: Layout, seed: int, scratch_mfn: int,
               loose: dict[int, np.ndarray] | None = None) -> dict:
    """The physical GGTT against the translation of what each guest wrote. For a vGPU in failsafe
    the mediator stopped shadowing its GGTT when it entered failsafe, so only what must hold
    whatever the guest did is checked: its entries point at its own RAM or the scratch page.
    So too for the entries a guest lists as loose (`loose`: their last write failed or its
    outcome is unknown, after a fault): either value may be there, and only isolation holds."""
    loose = loose or {}
    reasons: list[str] = []
    owned = np.zeros(len(dump), dtype=bool)
    reset_entry = U64(gtt.encode(scratch_mfn, gtt.PTE_PRESENT))     # entries never written
    per_vgpu = {}
    for v in vgpus:
        p = v["partition"]
        vm = v["id"]
        a0, an = gtt.index_of_gm(p["aperture_base"]), gtt.index_of_gm(p["aperture_size"])
        h0, hn = gtt.index_of_gm(p["hidden_base"]), gtt.index_of_gm(p["hidden_size"])
        glob = np.concatenate([np.arange(a0, a0 + an), np.arange(h0, h0 + hn)])
        owned[glob] = True
        expect = np.full(len(dump), reset_entry, dtype=U64)
        region = layout.vm_region(vm)
        idx, vals = guest_maps.get(vm, (np.zeros(0, np.int64), np.zeros(0, U64)))
        inside = owned[idx] if len(idx) else np.zeros(0, bool)
        if len(idx) and not inside.all():
            reasons.append(f"vGPU {vm}: the guest's map holds entries outside its partition")
        p2m = make_p2m(region, seed)
        expect[idx] = expected_host_entries(vals, p2m, scratch_mfn)
        got = dump[glob]
        want = expect[glob]
        differs = got != want
        if len(loose.get(vm, ())):
            free = np.zeros(len(dump), dtype=bool)
            free[loose[vm]] = True
            differs &= ~free[glob]
        bad = np.flatnonzero(differs)
        frames = gtt.frame_of(got)
        pres = gtt.present(got)
        foreign = pres & (frames != U64(scratch_mfn)) & ((frames < U64(region.base_mfn)) |
                                                         (frames >= U64(region.end_mfn)))
        per_vgpu[vm] = {"entries": int(len(glob)), "mapped": int(len(idx)), "mismatched": int(len(bad)),
                        "foreign": int(foreign.sum()), "loose": int(len(loose.get(vm, ())))}
        if len(bad) and not v.get("failsafe"):
            i = int(glob[bad[0]])
            reasons.append(f"vGPU {vm}: {len(bad)} physical GGTT entries differ from the translation "
                           f"of the guest's entries (first: index {i:#x} is {int(dump[i]):#x}, "
                           f"expected {int(expect[i]):#x})")
        if foreign.any():
            reasons.append(f"vGPU {vm}: {int(foreign.sum())} GGTT entries point outside VM {vm}'s RAM")
    # the host's own GM starts with its mapping of the host pool (page k -> pool frame k)
    host = layout.host
    pool_map = gtt.encode(np.arange(host.base_mfn, host.end_mfn, dtype=U64), gtt.PTE_PRESENT | gtt.PTE_RW)
    if not np.array_equal(dump[:host.frames], pool_map):
        bad = int(np.flatnonzero(dump[:host.frames] != pool_map)[0])
        reasons.append(f"the host's GGTT mapping of its pool is wrong at index {bad:#x}: "
                       f"{int(dump[bad]):#x}, expected {int(pool_map[bad]):#x}")
    owned[:host.frames] = True
    outside = np.flatnonzero(~owned & (dump != 0))
    if len(outside):
        reasons.append(f"{len(outside)} physical GGTT entries outside every vGPU partition were "
                       f"written (first: index {int(outside[0]):#x})")
    return {"vgpus": per_vgpu, "outside_written": int(len(outside)), "reasons": reasons}


def check_probes(vm: int, mfns_hit: list[int], verify: dict, layout: Layout,
                 failsafe: bool = False) -> list[str]:
    """GPU writes through the vGPU's GGTT land in its own RAM (or the GGTT scratch page, which
    belongs to no VM) only; and, unless its GGTT is frozen in failsafe, each one where the
    guest's own entry says."""
    region = layout.vm_region(vm)
    scratch = layout.host.base_mfn
    reasons = []
    stray = [m for m in mfns_hit if not region.base_mfn <= m < region.end_mfn and m != scratch]
    if stray:
        reasons.append(f"vGPU {vm}: {len(stray)} GPU writes through its GGTT hit machine frames "
                       f"outside its RAM (first {stray[0]:#x})")
    if verify["landed"] != verify["probes"] and not failsafe:
        reasons.append(f"vGPU {vm}: {verify['probes'] - verify['landed']} of {verify['probes']} GPU "
                       f"writes through its GM did not land in its own page: "
                       + "; ".join(verify["misses"][:3]))
    return reasons


def fault_windows(faults: dict, grace_s: float, spawn_s: float = 0.0) -> list[dict]:
    """When each node fault and partition of a run could cost operations, in seconds from the
    start of the load: from the fault to its end (a pause's length, a killed node's return),
    plus `grace_s` (the guests' hang check and the links' liveness timeout: the time a fault's
    effects take to show and clear). A partition's time counts from its link's first frame,
    at the nodes' start, `spawn_s` (< 0) before the load. Frame faults (drop, dup, reorder,
    corrupt, delay) open no window: the link protocol must hide them."""
    out = []
    for nf in faults.get("nodes", []):
        if nf.get("at_s") is None:
            continue
        length = nf.get("length_s") or nf.get("ready_s") or 0.0
        out.append({"fault": nf.get("spec") or f"{nf['kind']}={nf['node']}",
                    "from_s": nf["at_s"], "to_s": nf["at_s"] + length + grace_s})
    for p in faults.get("plan", []):
        if p.get("kind") == "partition":
            start = spawn_s + p["at_ns"] / 1e9
            out.append({"fault": f"partition={p['link']}@{p['at_ns'] / 1e9:g}s+{p['length_ns'] / 1e9:g}s",
                        "from_s": start, "to_s": start + p["length_ns"] / 1e9 - spawn_s + grace_s})
    return out


def fault_costs(timeline: dict, t_load_ns: int, windows: list[dict]) -> tuple[list[dict], dict]:
    """What each fault window cost a guest, from its timeline: failed and unknown operations and
    failed workloads in the bins that overlap the window (a bin in several windows counts for
    the first). Returns the per-fault rows and what fell outside every window."""
    rows = [{"fault": w["fault"], "failed_ops": 0, "unknown_ops": 0, "failed_workloads": 0}
            for w in windows]
    outside = {"failed_ops": 0, "unknown_ops": 0, "failed_workloads": 0}
    if not timeline or not timeline.get("bins"):
        return rows, outside
    step = timeline["interval_s"]
    t0 = (timeline["t0_ns"] - t_load_ns) / 1e9
    series = [("failed_ops", v.get("failed", [])) for v in timeline.get("ops", {}).values()]
    series += [("unknown_ops", v.get("unknown", [])) for v in timeline.get("ops", {}).values()]
    series.append(("failed_workloads", timeline.get("workloads", {}).get("failed", [])))
    for key, counts in series:
        for k, n in enumerate(counts):
            if not n:
                continue
            a, b = t0 + k * step, t0 + (k + 1) * step
            for row, w in zip(rows, windows):
                if a < w["to_s"] and b > w["from_s"]:
                    row[key] += n
                    break
            else:
                outside[key] += n
    return rows, outside


def check_workloads(reports: dict[int, dict], hostile: frozenset[int] = frozenset(),
                    excused: dict[int, int] | None = None) -> list[str]:
    """Every guest operation ended exactly once; none failed (a hostile guest's may: its attacks
    and, once the kernel put its vGPU in failsafe, its GPU work fail by design; and so may those
    a fault of the plan cost, `excused` per VM); no read returned a value no write could have
    left, hostile or not."""
    reasons = []
    excused = excused or {}
    for vm, r in sorted(reports.items()):
        if r.get("boot_error"):
            reasons.append(f"guest {vm}: boot failed: {r['boot_error']}")
        if r["pending"]:
            reasons.append(f"guest {vm}: {r['pending']} operations still pending at the end")
        if r.get("faulting_pages"):
            reasons.append(f"guest {vm}: {r['faulting_pages']} pages still wait for a faulting "
                           f"store to be acknowledged at the end (a WRITE_DONE lost or unhandled)")
        unknown = r.get("unknown", 0)
        if r["issued"] != r["completed"] + r["failed"] + unknown + r["pending"]:
            reasons.append(f"guest {vm}: issued {r['issued']} != completed {r['completed']} + failed "
                           f"{r['failed']} + unknown {unknown} + pending {r['pending']}: an "
                           f"operation was lost or doubled")
        failed = r["failed"] - excused.get(vm, 0)
        if failed > 0 and vm not in hostile:
            why = "; ".join(f"{k} (x{v})" for k, v in list(r["fail_reasons"].items())[:3])
            reasons.append(f"guest {vm}: {failed} operations failed"
                           + (" outside every fault's window" if excused.get(vm) else "") + f": {why}")
        if r["mismatches"]:
            reasons.append(f"guest {vm}: {r['mismatches']} register reads returned a value no write "
                           f"before them could have left")
    return reasons


def check_hostile(vm: int, report: dict | None, failsafe: str | None) -> tuple[dict, list[str]]:
    """A hostile guest's campaign: every attack ended as the kernel ends it, and the vGPU is in
    failsafe at the end exactly when the campaign ended with an attack that sends it there."""
    if not report:
        return {}, [f"vGPU {vm}: the hostile mix ran, but the guest reported no attacks"]
    reasons = []
    for kind, st in sorted(report["attacks"].items()):
        if st["unexpected"]:
            reasons.append(f"vGPU {vm}: attack {kind}: {st['unexpected']} of {st['attempts']} did not end "
                           f"as the kernel ends it ({'/'.join(st['expected'])}): "
                           + "; ".join(r for r in report["reasons"] if r.startswith(kind + ":"))[:300])
    if report["ended_in_failsafe"] != (failsafe is not None):
        reasons.append(f"vGPU {vm}: the campaign {'ended' if report['ended_in_failsafe'] else 'did not end'} "
                       f"with an attack that sends the vGPU to failsafe, but the mediator has it "
                       f"{'in failsafe (' + failsafe + ')' if failsafe else 'active'}")
    summary = {kind: {o: st[o] for o in ("attempts", "refused", "failsafe", "failed", "contained",
                                           "unexpected")} | {"expected": st["expected"]}
               for kind, st in report["attacks"].items()}
    return {"attacks": summary, "attempted": report["attempted"], "planned": report["planned"],
            "reboots": report["reboots"], "ended_in_failsafe": report["ended_in_failsafe"],
            "failsafe": failsafe}, reasons


def check_links(snapshots: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Per directed link: what one end sent must equal what the other received, with no gaps.
    Taken after the load has drained, so only the launcher's own STATS traffic is in flight.
    Both ends count the stream of the receiver's current incarnation (a restart starts it
    over; what went to earlier incarnations is listed apart). Bodies the protocol gave up, when
    the peer was silent past the liveness timeout, may or may not have arrived: with them the
    check is sent - given up <= received <= sent."""
    rows, reasons = [], []
    for name, snap in sorted(snapshots.items()):
        for peer, c in sorted(snap["links"].items()):
            other = snapshots.get(peer, {}).get("links", {}).get(name)
            received = other["received"] if other else None
            given_up = c.get("given_up", 0)
            # the link protocol's work, counted apart: what the sender sent again, and what the
            # receiver suppressed as repeats or refused by the checksum
            row = {"from": name, "to": peer, "sent": c["sent"], "received": received,
                   "gaps": other["gaps"] if other else None,
                   "retransmits": c.get("retransmits", 0), "acks": c.get("acks", 0),
                   "duplicates": other.get("duplicates", 0) if other else None,
                   "corrupt": other.get("corrupt", 0) if other else None,
                   "given_up": given_up, "earlier": c.get("earlier", {}),
                   "memory": c.get("memory", False)}
            rows.append(row)
            if other is None:
                continue
            # a node's snapshot is taken before it answers the launcher's STATS: that one reply
            # reaches the launcher after the count was taken
            expect = c["sent"] + (1 if peer == "launcher" else 0)
            if not expect - given_up <= received <= expect:
                reasons.append(f"link {name} -> {peer}: sent {c['sent']}"
                               + (f" ({given_up} given up)" if given_up else "")
                               + f", received {received}")
            if other["gaps"]:
                reasons.append(f"link {name} -> {peer}: {other['gaps']} messages never arrived")
    return rows, reasons


ERROR_FAMILIES = {"bad_frames": "gvtbench_bad_frames", "refused_messages": "gvtbench_refused_messages",
                  "late_replies": "gvtbench_late_replies", "dropped_frames": "gvtbench_dropped_frames"}


def _family_total(snap: dict, name: str) -> int:
    fam = snap.get("runtime", {}).get(name)
    return int(sum(v for _labels, v in fam["rows"])) if fam else 0


# what a request may fail with when a node died under it or its vGPU went with a mediator:
# expected in a run with node faults (counted apart), a failure of the run in any other
FAULT_CODES = frozenset({"ENODEV", "ECONNRESET", "ENOTCONN", "ETIMEDOUT", "EHOSTUNREACH",
                         "ECANCELED"})


def check_errors(snapshots: dict[str, dict], hostile: frozenset[int] = frozenset(),
                 node_faults: bool = False) -> tuple[dict, list[str]]:
    """Every node's own error counts. An internal error (a handler or task that failed with
    something other than a refusal) is a bug and fails the run; so does any request that failed,
    any frame refused as malformed or for its route, any reply that came too late and any frame
    that could not be sent, unless it was a hostile vGPU's request (those are expected, and
    counted apart), or, in a run with node faults, one that failed as a request to a node that
    died or a vGPU that was lost does (FAULT_CODES: counted apart too)."""
    reasons: list[str] = []
    summary: dict[str, dict] = {}
    for name, snap in sorted(snapshots.items()):
        errs = snap.get("errors", {"by_vgpu": {}, "internal": []})
        row = {k: _family_total(snap, fam) for k, fam in ERROR_FAMILIES.items()}
        row["internal_errors"] = _family_total(snap, "gvtbench_internal_errors")
        expected: dict[str, int] = {}
        unexpected: dict[str, int] = {}
        by_fault: dict[str, int] = {}
        for vg, codes in errs["by_vgpu"].items():
            for code, n in codes.items():
                into = (expected if int(vg) in hostile else
                        by_fault if node_faults and code in FAULT_CODES else unexpected)
                into[code] = into.get(code, 0) + n
        row["failed_requests"] = unexpected
        row["hostile_failed_requests"] = expected
        row["fault_failed_requests"] = by_fault
        summary[name] = row
        if row["internal_errors"]:
            reasons.append(f"{name}: {row['internal_errors']} internal errors (bugs): "
                           + "; ".join(errs["internal"][:3]))
        if unexpected:
            reasons.append(f"{name}: requests failed that the run did not expect: "
                           + ", ".join(f"{c} x{n}" for c, n in sorted(unexpected.items())))
        for k in ERROR_FAMILIES:
            # a reply to a request already failed when its peer went silent (a pause past the
            # liveness timeout) comes late by design in a run with node faults
            if row[k] and not (node_faults and k == "late_replies"):
                reasons.append(f"{name}: {row[k]} {k.replace('_', ' ')}")
    return summary, reasons


def verdict(*reason_lists: list[str]) -> tuple[str, list[str]]:
    reasons = [r for rs in reason_lists for r in rs]
    return ("fail" if reasons else "pass"), reasons


def summarize_traps(snap: dict, vm: int, stage: str) -> dict[str, Any]:
    out = {}
    for kind in bar0.TRAP_KINDS:
        h = hist_from_snapshot(snap["stats"], TRAP_LATENCY, vgpu=vm, kind=kind, stage=stage)
        if h.n:
            out[kind] = h.summary_us()
    return out


def replay_allowance(fail_reasons: dict[str, int]) -> int:
    """The workloads a GPU reset failed at the mediator, with those dropped behind them: each may
    have run on the gpu that died, and runs again when the guest's next submission of its
    context resumes from the context's ring head (the mediator, as the kernel does, starts a
    workload at the guest's head when none of that context is queued; the guest's head never
    moved past a workload that got no completion)."""
    return sum(n for reason, n in fail_reasons.items()
               if reason.startswith("GPU reset") or reason.startswith("dropped after"))


def check_gpu_workloads(vm: int, wl: dict, ram: dict, hostile: bool = False,
                        excused: int = 0, replays: int = 0) -> list[str]:
    """A guest's workloads: none lost, none run twice, none storing where it should not, none
    failed that the load did not mean to fail (a hostile guest's may fail, and `excused` may: a
    fault cost them), its RAM exactly as it and its workloads left it (the attacker's too: only
    what its attacks may write is loose)."""
    reasons = []
    if wl.get("lost"):
        reasons.append(f"vGPU {vm}: {wl['lost']} workloads were submitted and never completed nor failed")
    if ram.get("duplicated", 0) > replays:
        reasons.append(f"vGPU {vm}: {ram['duplicated']} workloads ran more than once"
                       + (f" (a GPU reset may account for {replays})" if replays else "") + ": "
                       + "; ".join(r for r in ram.get("reasons", []) if "counter" in r)[:300])
    misplaced = wl.get("misplaced", 0) + ram.get("misplaced", 0)
    if misplaced:
        why = "; ".join(list(wl.get("fail_reasons", {}))[:2] + list(ram.get("reasons", []))[:2])
        reasons.append(f"vGPU {vm}: {misplaced} workload stores misplaced: {why}")
    unexpected = wl.get("failed", 0) - wl.get("failed_expected", 0) - excused
    if unexpected > 0 and not hostile:
        reasons.append(f"vGPU {vm}: {unexpected} workloads failed that the load did not mean to fail"
                       + (" (outside every fault's window)" if excused else ""))
    if wl.get("csb_mismatches") and not hostile:
        reasons.append(f"vGPU {vm}: {wl['csb_mismatches']} CSB registers disagreed with the status page copy")
    if ram.get("violations"):
        reasons.append(f"VM {vm}: {ram['violations']} pages of its RAM differ from what the guest and its "
                       f"workloads wrote: " + "; ".join(ram.get("reasons", [])[:3]))
    return reasons


def summarize_workloads(snap: dict, vm: int, stage: str = "guest") -> dict[str, Any]:
    """Workload latency of a vGPU: all engines, and each one."""
    out: dict[str, Any] = {}
    h = hist_from_snapshot(snap["stats"], WORKLOAD_LATENCY, vgpu=vm, stage=stage)
    if h.n:
        out["all"] = h.summary_us()
        fam = snap["stats"].get(WORKLOAD_LATENCY) or {"rows": [], "labels": []}
        for labels, _v in fam["rows"]:
            lab = dict(zip(fam["labels"], labels))
            if str(lab.get("vgpu")) == str(vm) and lab.get("stage") == stage:
                e = hist_from_snapshot(snap["stats"], WORKLOAD_LATENCY, vgpu=vm, stage=stage,
                                       engine=lab["engine"])
                out[lab["engine"]] = e.summary_us()
    return out
