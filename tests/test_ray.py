"""Runs on a real Ray cluster of three Ray nodes on this machine (ray.cluster_utils.Cluster): the
node processes run as Ray actors' children where the placement group put them, give the verdict
and guest memory of a run of the same seed and ops on the launcher's own children, start again
in their actor after a node fault, and are gone after the run, after a killed launcher too."""
import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest

from bench import config
from bench.executor import SLOT_DIR_PREFIX, NodeSlot, RayExecutor
from bench.launch import Launcher, RunFailed

pytestmark = pytest.mark.xdist_group("ray")

RAY_NODES = 3


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(RAY_NODES - 1):
            c.add_node(num_cpus=1)
        c.wait_for_nodes(timeout=60)
        yield c
    finally:
        c.shutdown()


def _cfg(transport: str, fabric: str, **run) -> dict:
    """A closed loop of one operation at a time and a fixed op count: guest memory at the end
    depends on the seed alone (see tests/test_scale.py)."""
    raw = {"run": {"ops": 120, "seed": 4, "transport": transport, "fabric": fabric, **run},
           "vgpus": {"count": 2, "ram_mib": 8, "per_process": 1},
           "load": {"mode": "closed", "concurrency": 1, "burst": 32,
                    "mix": {"mmio-read": 0.3, "mmio-write": 0.2, "gtt-burst": 0.2, "submit": 0.2,
                            "ppgtt-churn": 0.1}}}
    return config.validate(raw, "test")


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return None


def _ray_run(cluster, cfg: dict, placement: str) -> tuple[dict, RayExecutor, dict[str, int | None],
                                                          dict[str, str]]:
    """The run on the cluster, its executor, the parent of each node process while the load
    ran (read from /proc: the cluster is on this machine), and the run's endpoints."""
    ex = RayExecutor(cluster.address, placement)
    parents: dict[str, int | None] = {}
    launcher = None

    def look(view: dict) -> None:
        if view["phase"] == "load" and not parents:
            parents.update({n: _ppid(p.node_pid) for n, (p, _k) in launcher.processes().items()})
    launcher = Launcher(cfg, on_progress=look, executor=ex)
    res = launcher.run()
    assert not any(os.path.exists(f"/proc/{s['pid']}") for s in ex.started), ex.started
    return res, ex, parents, launcher.eps


def _same_as_local(cfg: dict, res: dict) -> None:
    local = Launcher(cfg).run()
    assert local["verdict"] == res["verdict"] == "pass", (local["reasons"], res["reasons"])
    assert res["memory_sha256"] == local["memory_sha256"]
    assert res["ledger"]["ggtt_sha256"] == local["ledger"]["ggtt_sha256"]
    assert all(v["guest"]["completed"] == 120 for v in res["vgpus"])


def _placed_by_the_group(ex: RayExecutor, parents: dict, cluster) -> set[str]:
    """Each process ran in its own actor, on its bundle's Ray node, as the actor's child; the
    Ray nodes they used."""
    where = ex.placement()
    assert sorted(where) == ["gpu/0", "guests/1", "guests/2", "hypervisor/0", "mediator/0"]
    ids = {n.node_id for n in cluster.list_all_nodes()}
    for proc, w in where.items():
        assert w["node_id"] == w["bundle_node_id"] and w["node_id"] in ids, (proc, w)
        assert parents[proc] == w["actor_pid"], (proc, parents, w)
    assert len({w["actor_pid"] for w in where.values()}) == len(where)
    return {w["node_id"] for w in where.values()}


def test_tcp_msg_spread_over_the_cluster_gives_the_local_verdict_and_memory(cluster):
    cfg = _cfg("tcp", "msg")
    res, ex, parents, eps = _ray_run(cluster, cfg, "spread")
    assert ex.strategy == "SPREAD"
    assert len(_placed_by_the_group(ex, parents, cluster)) == RAY_NODES
    # each endpoint is on the Ray address of the host of the process that binds it
    where = ex.placement()
    for ep, proc in [("gpu/0", "gpu/0"), ("mediator/0", "mediator/0"), ("hypervisor/0", "hypervisor/0"),
                     ("hypervisor/0.vm1", "hypervisor/0"), ("hypervisor/0.vm2", "hypervisor/0")]:
        assert eps[ep].startswith(f"tcp://{where[proc]['ip']}:"), (ep, eps)
    assert len(set(eps.values())) == len(eps)
    # CPU and memory were sampled through the actors
    procs = res["resources"]["processes"]
    assert sorted(procs) == sorted(parents) and all(p["rss_mib"] > 0 for p in procs.values())
    _same_as_local(cfg, res)


def test_ipc_shm_packs_on_the_launchers_host_and_gives_the_local_verdict_and_memory(cluster):
    cfg = _cfg("ipc", "shm")
    res, ex, parents, eps = _ray_run(cluster, cfg, "pack")
    assert ex.strategy == "PACK"
    assert len(_placed_by_the_group(ex, parents, cluster)) == 1
    assert all(ep.startswith("ipc://") for ep in eps.values())
    _same_as_local(cfg, res)


def test_a_host_process_on_ray_is_one_actor_and_gives_the_split_runs_verdict_and_memory(cluster):
    """run.processes = "machine": the GPU's gpu, mediator and hypervisor are one process, so
    three processes fit strict-spread on three Ray nodes (split's five do not, below); tcp and
    CURVE across, the msg fabric; the local split run of the seed gives the same guest memory."""
    cfg = _cfg("tcp", "msg", processes="machine")
    res, ex, parents, eps = _ray_run(cluster, cfg, "strict-spread")
    where = ex.placement()
    assert sorted(where) == ["guests/1", "guests/2", "host/0"]
    assert len({w["node_id"] for w in where.values()}) == RAY_NODES
    for ep in ("gpu/0", "mediator/0", "hypervisor/0", "hypervisor/0.vm1"):
        assert eps[ep].startswith(f"tcp://{where['host/0']['ip']}:"), (ep, eps)
    _same_as_local(_cfg("tcp", "msg"), res)


def test_a_node_restarted_on_ray_starts_again_in_its_actor_and_the_run_passes(cluster):
    raw = {"run": {"duration_s": 4, "seed": 5, "transport": "tcp", "fabric": "msg"},
           "vgpus": {"count": 2, "ram_mib": 16, "per_process": 1},
           "load": {"mode": "open", "rate": 100, "hang_timeout_s": 1,
                    "mix": {"mmio-read": 0.3, "mmio-write": 0.2, "gtt-burst": 0.1, "submit": 0.3,
                            "ppgtt-churn": 0.1}},
           "faults": {"links": ["restart=gpu@1500ms"]}}
    res, ex, _parents, _eps = _ray_run(cluster, config.validate(raw, "test"), "spread")
    assert res["verdict"] == "pass", res["reasons"]
    [nf] = res["faults"]["nodes"]
    assert nf["node"] == "gpu/0" and nf["kind"] == "restart" and 0 < nf["ready_s"] < 10
    gpus = [s for s in ex.started if s["process"] == "gpu/0"]
    assert len(gpus) == 2 and gpus[0]["pid"] != gpus[1]["pid"]
    assert gpus[0]["node_id"] == gpus[1]["node_id"]     # the same actor, so the same endpoint


def test_strict_spread_refuses_more_processes_than_ray_nodes_naming_both(cluster):
    ex = RayExecutor(cluster.address, "strict-spread")
    with pytest.raises(RunFailed, match=f"5 processes .* {RAY_NODES} Ray nodes alive"):
        Launcher(_cfg("tcp", "msg"), executor=ex).run()
    assert not ex.started


def test_polling_a_node_on_ray_never_waits_for_its_busy_actor(cluster, tmp_path):
    """The launcher polls every node process many times a second from the loop that also keeps
    its links alive: a poll that waited for an actor busy elsewhere stalled that loop past the
    links' liveness timeout (a 128-vGPU run on 4 Ray nodes lost its guests' links)."""
    import ray
    ex = RayExecutor(cluster.address, "pack")
    try:
        ex.place(["p"], _cfg("tcp", "msg"), "polltest")
        proc = ex.start("p", [sys.executable, "-c", "import time; time.sleep(60)"],
                        str(tmp_path / "p.log"))
        busy = ex.actors["p"].wait.remote(proc.node_pid, 20.0)   # the actor's thread, for 20 s
        for _ in range(3):
            assert proc.poll() is None
        assert not ray.wait([busy], timeout=0)[0], "poll() waited for the busy actor"
        os.kill(proc.node_pid, 9)       # this machine's: the actor's wait returns at once
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the exit was never seen"
            time.sleep(0.05)
        assert proc.returncode == -9
    finally:
        ex.close()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_the_cli_says_what_is_wrong_with_a_ray_address_or_placement(tmp_path):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('[run]\nops = 10\n[vgpus]\ncount = 1\nram_mib = 8\n')
    with _closed_port() as port:
        p = _cli(str(cfgf), "--ray", f"127.0.0.1:{port}")
    assert p.returncode == 2 and "no Ray cluster answers there" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    p = _cli(str(cfgf), "--ray", "local", "--ray-placement", "spread")
    assert p.returncode == 2 and 'needs run.transport = "tcp"' in p.stderr, p.stderr
    p = _cli(str(cfgf), "--ray-placement", "pack")
    assert p.returncode == 2 and "needs --ray ADDRESS" in p.stderr, p.stderr


@contextlib.contextmanager
def _closed_port():
    """A port nothing listens on: bound (so nobody else takes it) and not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _arg(pid: int, flag: str) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    return argv[argv.index(flag) + 1]


def _run_processes(run_prefix: str) -> list[int]:
    """The processes of a run, by the --run-id their command line carries."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a == b"--run-id" and b.startswith(run_prefix.encode()) for a, b in zip(argv, argv[1:])):
            out.append(int(d))
    return out


def test_a_killed_launcher_on_ray_leaves_no_node_process(cluster, tmp_path):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text('[run]\nduration_s = 60\ntransport = "tcp"\nfabric = "msg"\n'
                    '[vgpus]\ncount = 2\nram_mib = 8\nper_process = 1\n')
    p = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", str(cfgf), "--ray",
                          cluster.address, "--ray-placement", "spread"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    prefix = f"{p.pid}x"
    try:
        deadline = time.monotonic() + 60
        while len(_run_processes(prefix)) < 5:
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "the run's five node processes never all ran"
            time.sleep(0.1)
        nodes = _run_processes(prefix)
        # their parents are Ray's actor workers, not the launcher
        assert all(_ppid(n) != p.pid for n in nodes)
        keys = {_arg(n, "--keys") for n in nodes}      # each actor's own folder
        assert len(keys) == 5 and all(k.startswith(f"/tmp/{SLOT_DIR_PREFIX}") for k in keys)
        p.kill()
        p.wait(timeout=10)
        # Ray kills the actors of a driver that died; each node dies with its actor
        deadline = time.monotonic() + 30
        while _run_processes(prefix) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _run_processes(prefix) == [], "node processes outlived their killed launcher"
        # the killed actors could not remove their folders (secret keys): the next actor on
        # the host removes those of actors that are gone
        assert all(os.path.isdir(os.path.dirname(k)) for k in keys)
        # (a killed actor may linger as a zombie until its raylet reaps it: still not alive)
        deadline = time.monotonic() + 30
        while True:
            NodeSlot().stop(0.1)
            left = [k for k in keys if os.path.exists(os.path.dirname(k))]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert left == [], f"folders of gone actors were kept: {left}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        p.stderr.close()
