"""Scale: vGPU types a config defines and a GPU with more fences (the kernel's capacity rule,
ENOSPC past it, available() agreeing with allocate()), pools of guests in one process (the same
verdict and memory as a process per guest), the run's CPU and memory figures, the warning when
the load fell behind, and `gvtbench scale` end to end."""
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import config
from bench.launch import Launcher
from nodes.errors import GvtError
from nodes.hw import MiB, partition
from nodes.mediator.aperture import GmAllocator
from nodes.node import guest_pools, host_pool_frames, vgpu_types

SMALL = {"low_gm_mib": 8, "high_gm_mib": 32, "fences": 2, "weight": 1}


def _cfg(**sections) -> dict:
    raw = {"vgpu_types": {"_64": dict(SMALL)}, "gpu": {"fences": 132},
           "mediator": {"max_vgpus": 64}, "vgpus": {"count": 64, "type": "_64", "ram_mib": 4}}
    for sec, table in sections.items():
        raw[sec] = {**raw.get(sec, {}), **table}
    return config.validate(raw, "test")


# ---- types and capacity --------------------------------------------------------------------------
def test_a_config_type_fits_64_vgpus_on_one_gpu_and_the_65th_is_enospc():
    cfg = _cfg()
    types = vgpu_types(cfg)
    assert types["_64"] == partition.VgpuType(8 * MiB, 32 * MiB, 2, 1)
    assert types["_8"] == partition.VGPU_TYPES["_8"]        # upstream's stay
    a = GmAllocator(1024 * MiB, fences=132, types=types)
    assert a.available("_64") == 64                         # fences: (132 - 4) / 2
    parts = [a.allocate("_64") for _ in range(64)]
    assert len({p.fence_base for p in parts}) == 64 and all(p.fence_num == 2 for p in parts)
    with pytest.raises(GvtError) as e:
        a.allocate("_64")
    assert e.value.code == "ENOSPC" and "fences" in e.value.text
    # with Gen9's 32 fences the same type fits 14: the fences bind first
    assert GmAllocator(1024 * MiB, types=types).available("_64") == 14


def test_the_config_refuses_what_cannot_be_created_naming_why():
    with pytest.raises(config.ConfigError) as e:
        config.validate({"vgpus": {"count": 8}, "mediator": {"max_vgpus": 16}}, "t")
    assert "vGPU 8 of 8 does not fit" in str(e.value) and "hidden GM" in str(e.value)
    with pytest.raises(config.ConfigError) as e:
        _cfg(gpu={"fences": 100})
    assert "vGPU 49 of 64" in str(e.value) and "fences" in str(e.value)
    bad = [({"vgpu_types": {"_8": dict(SMALL)}}, "upstream"),
           ({"vgpu_types": {"t": {**SMALL, "fences": 17}}}, "fences"),
           ({"vgpu_types": {"t": {k: v for k, v in SMALL.items() if k != "weight"}}}, "missing"),
           ({"vgpu_types": {"t": {**SMALL, "colour": 1}}}, "unknown key"),
           ({"vgpu_types": {"bad name": dict(SMALL)}}, "type name"),
           ({"vgpus": {"type": "_3"}}, "unknown vGPU type"),
           ({"gpu": {"fences": 513}}, "at most 512")]
    for raw, says in bad:
        with pytest.raises(config.ConfigError) as e:
            config.validate(raw, "t")
        assert says in str(e.value), (raw, str(e.value))


@settings(max_examples=150, deadline=None)
@given(types=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 900), st.integers(1, 16)),
                      min_size=1, max_size=4),
       fences=st.integers(5, 512), aperture=st.integers(129, 2048),
       steps=st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=40))
def test_available_agrees_with_allocate_for_any_types(types, fences, aperture, steps):
    """Whatever the types, the GPU's fences and the order of creations and removals: a type is
    available exactly while allocate() can place it, and the count is how many it places."""
    table = {f"t{i}": partition.VgpuType(lo * MiB, hi * MiB, f, 1) for i, (lo, hi, f) in enumerate(types)}
    a = GmAllocator(aperture * MiB, fences=fences, types=table)
    held = []
    for create, pick in steps:
        name = f"t{pick % len(table)}"
        if create:
            n = a.available(name)
            try:
                held.append(a.allocate(name))
                assert n >= 1
            except GvtError as err:
                assert n == 0 and err.code == "ENOSPC"
        elif held:
            a.release(held.pop(pick % len(held)))
    for name in table:                  # and the count is exact: that many, then ENOSPC
        n = a.available(name)
        got = [a.allocate(name) for _ in range(n)]
        with pytest.raises(GvtError) as e:
            a.allocate(name)
        assert e.value.code == "ENOSPC"
        for part in got:
            a.release(part)


def test_the_host_pool_grows_with_the_vgpus_it_serves():
    assert host_pool_frames(config.validate({}, "t")) == 4096            # 7 vGPUs: 16 MiB
    assert host_pool_frames(_cfg()) == 512 * 64                          # 2 MiB a vGPU slot
    assert host_pool_frames(_cfg(mediator={"max_vgpus": 200})) == partition.HOST_LOW_GM // 4096


# ---- pools -------------------------------------------------------------------------------------
def test_pools_follow_per_process_and_guests_in_a_pool_cannot_be_killed_alone():
    assert guest_pools(_cfg(vgpus={"per_process": 16})) == [list(range(i, i + 16)) for i in (1, 17, 33, 49)]
    assert guest_pools(_cfg(vgpus={"per_process": 1}))[:2] == [[1], [2]]
    with pytest.raises(config.ConfigError) as e:
        _cfg(vgpus={"per_process": 8}, faults={"links": ["kill=guest3@1s"]})
    assert "per_process = 1" in str(e.value)
    _cfg(vgpus={"per_process": 1}, faults={"links": ["kill=guest3@1s"]})


def _pool_run(per_process: int) -> dict:
    raw = {"run": {"ops": 120, "seed": 4},
           "vgpus": {"count": 4, "ram_mib": 8, "per_process": per_process},
           # one operation at a time: with more, the order in which they complete (and so what
           # guest memory holds at the end) varies from run to run, pooled or not
           "load": {"mode": "closed", "concurrency": 1, "burst": 32,
                    "mix": {"mmio-read": 0.3, "mmio-write": 0.2, "gtt-burst": 0.2, "submit": 0.2,
                            "ppgtt-churn": 0.1}}}
    return Launcher(config.validate(raw, "test")).run()


def test_a_pool_of_guests_gives_what_a_process_per_guest_gives():
    """Four guests in one process and four processes of one guest, same seed and op count: the
    same verdict, every op done, the same guest memory; and a pooled guest costs little memory."""
    pooled, alone = _pool_run(4), _pool_run(1)
    for res in (pooled, alone):
        assert res["verdict"] == "pass", res["reasons"]
        assert all(v["guest"]["completed"] == 120 for v in res["vgpus"])
    assert pooled["memory_sha256"] == alone["memory_sha256"]
    procs = pooled["resources"]["processes"]
    assert sorted(procs) == ["gpu/0", "guests/1", "hypervisor/0", "mediator/0"]
    assert procs["guests/1"]["vgpus"] == 4
    one = alone["resources"]["processes"]
    assert sorted(n for n in one if n.startswith("guests/")) == ["guests/1", "guests/2", "guests/3", "guests/4"]
    # the memory a guest adds to a pool, against a process of its own
    extra = (procs["guests/1"]["rss_mib"] - one["guests/1"]["rss_mib"]) / 3
    assert extra <= 5.0, procs


# ---- what a run cost, and a load that fell behind ---------------------------------------------
def test_a_run_counts_its_cpu_and_says_when_the_load_fell_behind():
    raw = {"run": {"duration_s": 1.5}, "vgpus": {"count": 1, "ram_mib": 4},
           "load": {"mode": "open", "rate": 200000, "mix": {"mmio-read": 1.0}},
           "thresholds": {"min_achieved_ratio": 0.9}}
    res = Launcher(config.validate(raw, "test")).run()
    r = res["resources"]
    assert r["cpu_s"] > 0 and r["counts"]["mmio_traps"] > 0
    assert r["per_cpu_s"]["mmio_traps"] == pytest.approx(r["counts"]["mmio_traps"] / r["cpu_s"], rel=0.01)
    assert set(r["processes"]) == {"gpu/0", "mediator/0", "hypervisor/0", "guests/1"}
    assert all(p["rss_mib"] > 0 for p in r["processes"].values())
    # 200,000 reads a second cannot be carried: a warning, and the threshold fails the verdict
    assert any("fell behind" in w for w in res["warnings"]), res["warnings"]
    assert res["verdict"] == "fail" and any("min_achieved_ratio" in x for x in res["reasons"])


def test_a_read_p99_far_past_the_unloaded_latency_is_a_warning():
    # the launcher's rule on the figures of a run (the PROBE itself: tests/test_guest.py; in a
    # real run: tests/test_run.py): past 20x its GPU's unloaded p50, a vGPU is named
    launcher = Launcher(config.validate({"vgpus": {"count": 3, "ram_mib": 4}}, "test"))
    launcher.unloaded = {"reads": 32, "gpus": [{"gpu": 0, "vgpu": 1, "p50_us": 500.0,
                                                "min_us": 400.0, "max_us": 900.0}]}
    rows = [{"id": v, "gpu": 0, "guest": {}, "traps": {"mmio_read": {"p99_us": p99}}}
            for v, p99 in ((1, 9_000.0), (2, 30_000.0), (3, 12_000.0))]
    warns = launcher._warnings(rows)
    assert len(warns) == 1 and "on 2 of 3 vGPUs" in warns[0] and "vGPU 2" in warns[0], warns
    assert "60x" in warns[0] and "500 us unloaded" in warns[0]
    # no figure (probe_reads = 0, or the probe failed): no such warning
    launcher.unloaded = {"reads": 0, "gpus": []}
    assert launcher._warnings(rows) == []


# ---- gvtbench scale ----------------------------------------------------------------------------
def test_gvtbench_scale_runs_each_count_and_writes_json_and_html(tmp_path):
    cfgp = tmp_path / "s.toml"
    cfgp.write_text((config.default_config_path().parent / "scale.toml").read_text()
                    .replace("rate = 5 ", "rate = 20 "))
    out, page = tmp_path / "s.json", tmp_path / "s.html"
    r = subprocess.run([sys.executable, "-m", "bench.cli", "scale", "--vgpus", "1,3", "--config",
                        str(cfgp), "--duration", "1.5", "--json", str(out), "--html", str(page)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert [x["vgpus"] for x in res["runs"]] == [1, 3] and res["verdict"] == "pass"
    assert res["processes"] == "machine"        # configs/scale.toml's: one process per GPU
    for row in res["runs"]:
        assert {"vgpus", "gpus", "verdict", "traps_per_s", "workloads_per_s", "p50_us", "p99_us",
                "ops_per_cpu_s", "rss_mib", "rss_per_vgpu_mib"} <= set(row)
        assert row["verdict"] == "pass" and row["gpus"] == 1
        assert row["traps_per_s"] > 0 and row["workloads_per_s"] > 0 and row["ops_per_cpu_s"] > 0
        assert 0 < row["p50_us"] <= row["p99_us"] and row["rss_per_vgpu_mib"] > 0
        assert sum(row["cpu_s_by_process"].values()) == pytest.approx(row["cpu_s"], abs=0.01)
        assert "host/0" in row["cpu_s_by_process"] and "mediator/0" not in row["cpu_s_by_process"]
    assert "<svg" in page.read_text()
    assert "vGPU" in r.stdout and "pass" in r.stdout


@pytest.mark.parametrize("arg, says", [("1,x", "counts >= 1"), ("2,2", "twice"), ("0", "counts >= 1"),
                                       ("1025", "at most 16 GPUs")])
def test_gvtbench_scale_refuses_bad_counts(arg, says):
    r = subprocess.run([sys.executable, "-m", "bench.cli", "scale", "--vgpus", arg],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr


def test_gvtbench_scale_puts_counts_past_max_vgpus_on_more_gpus():
    from bench.scale import configs_for
    cfg = config.load(config.default_config_path().parent / "scale.toml")
    got = [(c["vgpus"]["count"], c["gpu"]["count"]) for c in configs_for(cfg, [1, 64, 65, 256], 1.0)]
    assert got == [(1, 1), (64, 1), (65, 2), (256, 4)]
