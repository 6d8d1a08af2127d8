"""The verdict's checks must fail when the evidence is wrong: each is fed a corrupted input."""
import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from bench import ledger
from nodes.hw import MiB
from nodes.hw import gtt
from nodes.mediator.aperture import GmAllocator
from nodes.memory import Layout, make_p2m
from nodes.stats import LatencyHistogram

SEED = 4


def _setup():
    layout = Layout.build(1024, {1: 2048, 2: 2048})
    alloc = GmAllocator(1024 * MiB)
    vgpus = [{"id": v, "partition": alloc.allocate("_8").to_wire()} for v in (1, 2)]
    scratch = layout.host.base_mfn
    dump = np.zeros(gtt.ENTRIES, dtype=np.uint64)
    host = layout.host              # the mediator maps its pool at the start of the host's GM
    dump[:host.frames] = gtt.encode(np.arange(host.base_mfn, host.end_mfn, dtype=np.uint64),
                                    gtt.PTE_PRESENT | gtt.PTE_RW)
    for v in vgpus:        # a new vGPU: every entry at scratch, present
        p = v["partition"]
        for base, size in ((p["aperture_base"], p["aperture_size"]), (p["hidden_base"], p["hidden_size"])):
            dump[base >> 12:(base + size) >> 12] = gtt.encode(scratch, gtt.PTE_PRESENT)
    # guest 1 maps three entries: RAM gfn, bad gfn, not present
    i0 = vgpus[0]["partition"]["aperture_base"] >> 12
    idx = np.array([i0, i0 + 1, i0 + 2])
    vals = np.array([gtt.encode(5, 3), gtt.encode(99999, 1), gtt.encode(6, 2)], dtype=np.uint64)
    p2m = make_p2m(layout.vm_region(1), SEED)
    dump[i0] = gtt.encode(int(p2m[5]), 3)
    dump[i0 + 1] = gtt.encode(scratch, 1)
    dump[i0 + 2] = gtt.encode(scratch, 0)     # not present: the scratch frame alone
    return layout, vgpus, dump, {1: (idx, vals)}, scratch, i0


def test_correct_ggtt_passes():
    layout, vgpus, dump, maps, scratch, _ = _setup()
    res = ledger.check_ggtt(dump, vgpus, maps, layout, SEED, scratch)
    assert res["reasons"] == [] and res["vgpus"][1]["mapped"] == 3


def test_not_present_entry_keeping_guest_flags_is_caught():
    """Rule 10: the kernel builds a not-present host entry from zero, so guest flag bits in it
    are a mediator bug the ledger must see."""
    layout, vgpus, dump, maps, scratch, i0 = _setup()
    dump[i0 + 2] = gtt.encode(scratch, 2)
    res = ledger.check_ggtt(dump, vgpus, maps, layout, SEED, scratch)
    assert any("differ" in r for r in res["reasons"])


def test_untranslated_entry_is_caught():
    layout, vgpus, dump, maps, scratch, i0 = _setup()
    dump[i0] = gtt.encode(5, 3)          # the gfn itself: the mediator forgot to translate
    res = ledger.check_ggtt(dump, vgpus, maps, layout, SEED, scratch)
    assert any("differ" in r for r in res["reasons"])
    assert any("outside VM 1" in r for r in res["reasons"])


def test_entry_into_another_vm_is_caught():
    layout, vgpus, dump, maps, scratch, i0 = _setup()
    dump[i0] = gtt.encode(layout.vm_region(2).base_mfn + 1, 3)
    res = ledger.check_ggtt(dump, vgpus, maps, layout, SEED, scratch)
    assert res["vgpus"][1]["foreign"] == 1


def test_write_outside_partitions_is_caught():
    layout, vgpus, dump, maps, scratch, _ = _setup()
    dump[layout.host.frames + 5] = gtt.encode(1234, 1)     # the host's range, past its pool
    res = ledger.check_ggtt(dump, vgpus, maps, layout, SEED, scratch)
    assert res["outside_written"] == 1 and any("outside every vGPU" in r for r in res["reasons"])


def test_workload_accounting():
    good = {"issued": 10, "completed": 10, "failed": 0, "unknown": 0, "pending": 0, "mismatches": 0,
            "fail_reasons": {}, "boot_error": None}
    assert ledger.check_workloads({1: good}) == []
    lost = dict(good, completed=9)
    assert any("lost or doubled" in r for r in ledger.check_workloads({1: lost}))
    stale = dict(good, mismatches=2)
    assert any("no write before them" in r for r in ledger.check_workloads({1: stale}))
    # a write whose outcome is unknown is neither lost nor failed
    indeterminate = dict(good, completed=8, unknown=2)
    assert ledger.check_workloads({1: indeterminate}) == []
    unacked = dict(good, faulting_pages=1)
    assert any("faulting store" in r for r in ledger.check_workloads({1: unacked}))
    failed = dict(good, completed=9, failed=1, fail_reasons={"EFAULT: x": 1})
    assert any("EFAULT" in r for r in ledger.check_workloads({1: failed}))


def test_link_conservation():
    snaps = {"a": {"links": {"b": {"sent": 5, "received": 3, "gaps": 0}}},
             "b": {"links": {"a": {"sent": 3, "received": 5, "gaps": 0}}}}
    assert ledger.check_links(snaps)[1] == []
    snaps["b"]["links"]["a"]["received"] = 4
    snaps["b"]["links"]["a"]["gaps"] = 1
    reasons = ledger.check_links(snaps)[1]
    assert any("sent 5, received 4" in r for r in reasons) and any("never arrived" in r for r in reasons)


def test_probe_outside_own_ram_is_caught():
    layout, *_ = _setup()
    own = layout.vm_region(1).base_mfn
    ok = {"probes": 2, "landed": 2, "misses": []}
    assert ledger.check_probes(1, [own, own + 1], ok, layout) == []
    assert ledger.check_probes(1, [own, layout.vm_region(2).base_mfn], ok, layout)
    assert ledger.check_probes(1, [own], {"probes": 2, "landed": 1, "misses": ["GM 0x0"]}, layout)


def test_latency_histogram_quantiles_and_buckets():
    h = LatencyHistogram()
    for v in range(1, 10001):
        h.record(v * 1000)              # 1 us .. 10 ms, uniform
    assert abs(h.quantile_ns(0.5) / 5_000_000 - 1) < 0.01
    assert abs(h.quantile_ns(0.99) / 9_900_000 - 1) < 0.01
    b = dict(h.prom_buckets())
    assert b["1e-06"] == 1 and b["+Inf"] == 10000 and b["1.0"] == 10000
    assert abs(b["0.001"] - 1000) <= 10          # an edge inside a bucket: within the 1% precision
    h2 = LatencyHistogram.from_dict(h.to_dict())
    h2.merge(h)
    assert h2.n == 20000 and h2.quantile_ns(0.5) == h.quantile_ns(0.5)
    assert h2.minus(h).encode() == h.encode()


def test_latency_histogram_is_the_standard_hdrhistogram():
    """The vectorized recording lands in the same counts as hdrh's own record_value, so the
    encoding in results is what HdrHistogram's tools decode, merge and plot."""
    rng = np.random.default_rng(7)
    vals = rng.lognormal(10, 2.5, 20_000).astype(np.int64) + 1
    ours, ref = LatencyHistogram(), HdrHistogram(1, 3600 * 10**9, 2)
    for i, v in enumerate(vals.tolist()):
        ours.record(v, 1 + i % 3)
        ref.record_value(min(v, 3600 * 10**9), 1 + i % 3)
    assert ours.encode() == ref.encode().decode()
    back = HdrHistogram.decode(ours.summary_us()["hdr"])
    assert back.get_total_count() == ours.n
    assert back.get_value_at_percentile(99.9) == ours.quantile_ns(0.999)
    with pytest.raises(ValueError, match="HdrHistogram"):
        LatencyHistogram.from_dict({"n": 1, "total_ns": 1, "hdr": "not base64!"})


GOOD_WL = {"submitted": 10, "completed": 10, "failed": 0, "failed_expected": 0, "lost": 0,
           "misplaced": 0, "csb_mismatches": 0, "fail_reasons": {}}
GOOD_RAM = {"pages_checked": 100, "violations": 0, "misplaced": 0, "duplicated": 0, "reasons": []}


def test_clean_workload_evidence_passes():
    assert ledger.check_gpu_workloads(1, GOOD_WL, GOOD_RAM) == []


def test_a_lost_workload_fails_the_verdict():
    wl = dict(GOOD_WL, completed=9, lost=1)
    reasons = ledger.check_gpu_workloads(1, wl, GOOD_RAM)
    assert any("never completed nor failed" in r for r in reasons)
    assert ledger.verdict(reasons)[0] == "fail"


def test_a_duplicated_workload_fails_the_verdict():
    ram = dict(GOOD_RAM, duplicated=1, reasons=["context 0x10001: its counter says 11 batches ran, "
                                                 "for 10 completed and 0 failed workloads of 1"])
    reasons = ledger.check_gpu_workloads(1, GOOD_WL, ram)
    assert any("ran more than once" in r for r in reasons)
    assert ledger.verdict(reasons)[0] == "fail"


def test_a_misplaced_token_fails_the_verdict_from_either_check():
    wl = dict(GOOD_WL, misplaced=1, fail_reasons={"token 0x1 of workload 0x10001/3 is not at gpa 0x200000": 1})
    assert any("misplaced" in r for r in ledger.check_gpu_workloads(1, wl, GOOD_RAM))
    ram = dict(GOOD_RAM, misplaced=2, violations=1, reasons=["VM 1 gfn 0x200 dword 4: holds 0x5, expected 0x0"])
    reasons = ledger.check_gpu_workloads(1, GOOD_WL, ram)
    assert any("misplaced" in r for r in reasons) and any("pages of its RAM" in r for r in reasons)


def test_only_failures_the_load_meant_are_forgiven():
    meant = dict(GOOD_WL, completed=8, failed=2, failed_expected=2)
    assert ledger.check_gpu_workloads(1, meant, GOOD_RAM) == []
    unmeant = dict(GOOD_WL, completed=8, failed=2, failed_expected=1)
    assert any("did not mean to fail" in r for r in ledger.check_gpu_workloads(1, unmeant, GOOD_RAM))


# ---- the nodes' own error counts ---------------------------------------------------------------
def _snap(internal=0, by_vgpu=None, bad=0, texts=()):
    rows = lambda n: {"type": "counter", "labels": [], "rows": [[[], n]] if n else []}   # noqa: E731
    return {"runtime": {"gvtbench_internal_errors": rows(internal), "gvtbench_bad_frames": rows(bad)},
            "errors": {"by_vgpu": by_vgpu or {}, "internal": list(texts)}}


def test_a_clean_run_has_no_error_reasons():
    summary, reasons = ledger.check_errors({"mediator": _snap(), "gpu": _snap()})
    assert reasons == [] and summary["mediator"]["internal_errors"] == 0


def test_an_internal_error_fails_the_run_even_next_to_a_hostile_guest():
    _s, reasons = ledger.check_errors({"mediator": _snap(1, texts=["RuntimeError: x at ppgtt.py:1"])},
                                      hostile=frozenset({1, 2}))
    assert reasons and "internal errors (bugs)" in reasons[0] and "ppgtt.py" in reasons[0]


def test_failed_requests_fail_the_run_unless_a_hostile_vgpu_made_them():
    snaps = {"mediator": _snap(by_vgpu={"2": {"EINVAL": 3}}), "hypervisor": _snap(by_vgpu={"0": {"EIO": 1}})}
    summary, reasons = ledger.check_errors(snaps, hostile=frozenset({2}))
    assert summary["mediator"]["hostile_failed_requests"] == {"EINVAL": 3}
    assert reasons == ["hypervisor: requests failed that the run did not expect: EIO x1"]
    _s, reasons = ledger.check_errors(snaps)
    assert len(reasons) == 2


def test_bad_frames_fail_the_run():
    _s, reasons = ledger.check_errors({"gpu": _snap(bad=2)}, hostile=frozenset({1}))
    assert reasons == ["gpu: 2 bad frames"]
