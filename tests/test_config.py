import subprocess
import sys

import pytest

from bench import config


def test_default_config_loads():
    cfg = config.load()
    assert cfg["vgpus"]["count"] == 2 and cfg["run"]["duration_s"] == 10


@pytest.mark.parametrize("text,key,words", [
    ("[run]\nduration_s = -1\n", "run.duration_s", "> 0"),
    ("[run]\ntransport = 'udp'\n", "run.transport", "'ipc' or 'tcp'"),
    ("[vgpus]\ntype = '_3'\n", "vgpus.type", "_8"),
    ("[vgpus]\ncount = 'two'\n", "vgpus.count", "got 'two'"),
    ("[load]\nratte = 5\n", "load.ratte", "unknown key"),
    ("[lode]\nrate = 5\n", "lode", "unknown section"),
    ("[load]\nmix = { 'mmio-reed' = 1.0 }\n", "load.mix.mmio-reed", "unknown mix"),
    ("[vgpus]\ncount = 9\n", "vgpus.count", "max_vgpus"),
    ("[run\n", "(syntax)", ""),
])
def test_bad_config_names_key_and_reason(tmp_path, text, key, words):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert key in str(e.value) and words in str(e.value) and "bad.toml" in str(e.value)


def test_cli_reports_bad_config_and_exits_2(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[load]\nrate = 0\n")
    r = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(p)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "load.rate" in r.stderr and "> 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_every_shipped_config_loads_and_the_256_vgpu_one_fits_its_gpus():
    """The configs/ files are the README's examples: each must load as it is, and the Ray scale
    target's must place 64 vGPUs of its type on each of its 4 GPUs, in pools of 32."""
    from pathlib import Path

    from nodes.node import guest_pools
    from nodes.topology import Topology
    shipped = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert len(shipped) >= 6
    for path in shipped:
        config.load(str(path))
    cfg = config.load(str(Path(__file__).parent.parent / "configs" / "scale256.toml"))
    topo = Topology(cfg)
    assert [len(st.vms) for st in topo.stacks] == [64, 64, 64, 64]
    assert [len(p) for p in guest_pools(cfg)] == [32] * 8
    assert cfg["run"]["transport"] == "tcp" and cfg["run"]["fabric"] == "msg"


def test_the_scheduler_and_the_gpu_cost_are_checked():
    cfg = config.validate({}, "t")
    assert cfg["scheduler"] == {"policy": "timeslice", "start_boost_ms": 2000, "hang_timeout_ms": 5640}
    for raw, words in (({"scheduler": {"policy": "fifo"}}, "scheduler.policy"),
                       ({"scheduler": {"hang_timeout_ms": -1}}, "scheduler.hang_timeout_ms"),
                       ({"gpu": {"cost": {"noop_ns": 1}}}, "gpu.cost"),
                       ({"gpu": {"cost": {"vertex_ns": 1.5}}}, "gpu.cost"),
                       ({"load": {"spin_ratio": 2}}, "load.spin_ratio")):
        with pytest.raises(config.ConfigError, match=words.replace(".", r"\.")):
            config.validate(raw, "t")
    cfg = config.validate({"gpu": {"cost": {"vertex_ns": 0}}, "scheduler": {"policy": "round_robin"}}, "t")
    assert cfg["gpu"]["cost"] == {"vertex_ns": 0} and cfg["scheduler"]["policy"] == "round_robin"
