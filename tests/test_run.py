"""Full runs: real processes, real ZeroMQ sockets, both transports and both fabrics."""
import os
import signal
import subprocess
import sys
import time

import pytest

from bench.launch import Launcher


def _shm_files(run_id):
    return [f for f in os.listdir("/dev/shm") if f.startswith(f"gvtbench-{run_id}-")]


def _run(cfg):
    launcher = Launcher(cfg)
    result = launcher.run()
    # teardown leaves nothing behind
    assert _shm_files(launcher.run_id) == []
    assert not os.path.exists(launcher.tmp)
    for p in launcher.procs.values():
        assert p.poll() is not None
    return result


@pytest.mark.parametrize("transport,fabric", [("ipc", "shm"), ("tcp", "msg")])
def test_full_run_passes(small_cfg, transport, fabric):
    res = _run(small_cfg(run__transport=transport, run__fabric=fabric, load__outside_ratio=0.5))
    assert res["verdict"] == "pass", res["reasons"]
    assert res["schema"] == 1 and res["seed"] == 11 and res["translator"] in ("c", "python")
    for v in res["vgpus"]:
        assert v["type"] == "_8"
        assert set(v["traps"]) >= {"mmio_read", "mmio_write", "gtt_write"}
        for s in v["traps"].values():
            assert s["count"] > 0 and 0 < s["p50_us"] <= s["p99_us"] <= s["p999_us"]
        # every GGTT write the guest aimed outside its partition was dropped, and no other
        assert v["ggtt"]["ok"] > 0 and v["guest"]["outside_probes"] > 0
        assert v["ggtt"]["dropped"] == v["guest"]["outside_probes"]
        assert v["probes"]["probes"] > 0 and v["probes"]["landed"] == v["probes"]["probes"]
        assert v["guest"]["issued"] == 300 == v["guest"]["completed"]
        tl = v["timeline"]
        assert tl["interval_s"] == 1.0 and tl["bins"] >= 1 and "timeline" not in v["guest"]
        assert set(tl["ops"]) == {"mmio-read", "mmio-write", "gtt-burst"}
        assert sum(sum(m["completed"]) for m in tl["ops"].values()) == 300
    assert all(r["received"] is None or r["received"] >= r["sent"] for r in res["ledger"]["links"])


def test_same_seed_same_ggtt_across_transports_and_fabrics(small_cfg):
    a = _run(small_cfg(run__transport="ipc", run__fabric="shm"))
    b = _run(small_cfg(run__transport="tcp", run__fabric="msg"))
    c = _run(small_cfg(run__transport="ipc", run__fabric="msg", run__seed=12))
    for r in (a, b, c):
        assert r["verdict"] == "pass", r["reasons"]
    assert a["ledger"]["ggtt_sha256"] == b["ledger"]["ggtt_sha256"]
    assert a["ledger"]["ggtt_sha256"] != c["ledger"]["ggtt_sha256"]


def test_pure_python_translator_run(small_cfg):
    res = _run(small_cfg(mediator__translator="python"))
    assert res["verdict"] == "pass", res["reasons"]
    assert res["translator"] == "python"


def test_cli_run_writes_json_and_exit_code(tmp_path):
    out = tmp_path / "r.json"
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('[run]\nops = 100\nduration_s = 2\n[vgpus]\ncount = 1\nram_mib = 16\n'
                    '[load]\nmode = "closed"\nburst = 32\n')
    p = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(cfgf), "--json", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "verdict: pass" in p.stdout and "mmio_read" in p.stdout
    import json
    res = json.loads(out.read_text())
    assert {"schema", "config", "seed", "translator", "vgpus", "ledger", "verdict", "reasons"} <= set(res)
    # each distribution is in the JSON as HdrHistogram's standard encoding: decodable by its own
    # package, it holds every sample the summary counts, and merges across vGPUs and kinds
    from hdrh.histogram import HdrHistogram
    merged = HdrHistogram(1, 3600 * 10**9, 2)
    for kind, s in res["vgpus"][0]["traps"].items():
        h = HdrHistogram.decode(s["hdr"])
        assert h.get_total_count() == s["count"] > 0, kind
        assert abs(h.get_value_at_percentile(99) / 1000 - s["p99_us"]) < 0.01, kind
        merged.add(h)
    assert merged.get_total_count() == sum(s["count"] for s in res["vgpus"][0]["traps"].values())
    # before the load, the unloaded read latency of the GPU's path (PROBE), in the JSON and printed
    (probe,) = res["unloaded"]["gpus"]
    assert res["unloaded"]["reads"] == 32 and probe["gpu"] == 0 and probe["vgpu"] == 1
    assert 0 < probe["min_us"] <= probe["p50_us"] <= probe["max_us"], probe
    assert "unloaded MMIO read latency on GPU 0" in p.stdout
    # thresholds nobody can meet fail the verdict and the exit code: a p99 in us, and a p99 no
    # larger than the unloaded p50 (a closed loop of 8 keeps reads queued behind each other)
    cfgf.write_text(cfgf.read_text() + "[thresholds]\nmmio_read_p99_us = 0.001\n"
                    "max_read_p99_over_unloaded = 1.0\n")
    p = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(cfgf)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "verdict: fail" in p.stdout and "mmio_read p99" in p.stdout
    assert "max_read_p99_over_unloaded" in p.stdout, p.stdout


def test_ctrl_c_leaves_no_process_and_no_shm(tmp_path):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('[run]\nduration_s = 60\n[vgpus]\ncount = 1\nram_mib = 16\n')
    # started with SIGINT ignored, as a background job of a script is (and as some test runners'
    # workers pass it on): Ctrl-C must still stop the run
    p = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(cfgf)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    prefix = f"gvtbench-{p.pid}x"
    while time.monotonic() < deadline:      # wait until the nodes made their regions
        made = [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]
        # the mediator's host pool and the hypervisor's VM RAM (not only its write-protect map)
        if any(f.endswith("-host0") for f in made) and any(f.endswith("-vm1") for f in made):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the run never created its shm regions")
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert [f for f in os.listdir("/dev/shm") if f.startswith(prefix)] == []
    ps = subprocess.run(["pgrep", "-f", f"--run-id {p.pid}x"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_killed_launcher_nodes_exit_and_files_are_swept(tmp_path):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('[run]\nduration_s = 60\n[vgpus]\ncount = 1\nram_mib = 16\n')
    p = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(cfgf)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prefix = f"gvtbench-{p.pid}x"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        made = [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]
        # the mediator's host pool and the hypervisor's VM RAM (not only its write-protect map)
        if any(f.endswith("-host0") for f in made) and any(f.endswith("-vm1") for f in made):
            break
        time.sleep(0.05)
    p.kill()
    p.wait()
    # the nodes die with their parent and remove the regions they own
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ps = subprocess.run(["pgrep", "-f", f"--run-id {p.pid}x"], capture_output=True, text=True)
        if not ps.stdout.strip():
            break
        time.sleep(0.1)
    assert not ps.stdout.strip(), "nodes outlived their launcher"
    from nodes.memory import sweep_stale_shm
    sweep_stale_shm()
    assert [f for f in os.listdir("/dev/shm") if f.startswith(prefix)] == []
