"""A grid on a real Ray cluster (`--cluster`): a head started with `ray start --head` on free
loopback ports, `normtf compare` sent to its address, the same numbers as the local pool's, a lost
worker retried, and a worker that does not share the driver's disk sending the run's files back."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from normtf import cluster, quiet  # noqa: E402
from normtf.config import TrainConfig  # noqa: E402
from normtf.errors import NormtfError  # noqa: E402
from normtf.evaluation import evaluate_file, load_model  # noqa: E402
from normtf.job import Options, RunSpec  # noqa: E402
from normtf.runs import RunDir  # noqa: E402
from processes import end_session, kill_descendant  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "200", "--deterministic"]
CLIENT = {}  # the head's Ray Client address, ray://127.0.0.1:<port>, and its logs directory
HEAD = {}  # the head's `ray start --block` process: the Ray workers a test may kill descend from it


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` different free loopback ports: each held until all are chosen (one chosen and
    released at a time, two of a head's ports came out the same and Ray refused to start)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="module")
def head():
    """A one-node Ray cluster of 2 CPUs, its ports chosen free, stopped after the tests. On loopback
    only (Ray otherwise announces the machine's network address; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    keeps it to 127.0.0.1, as on macOS), with a token of its own (Ray's token authentication, which
    the driver in the test process's children finds through the same variables). `ray start --head
    --block` runs as this test's child in a process session of its own: every process of the head
    (GCS, raylet, its workers, each of these in a process group of its own) is in that session, so
    the tests stop that head and nothing else (`ray stop` stops every Ray on the machine, a user's
    own cluster included): SIGTERM to `ray start`, which drains the node and ends its processes,
    then SIGKILL to whatever of the session is left, and nothing may be."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    token = Path(temp) / "auth_token"
    token.write_text(os.urandom(16).hex())
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    port, *others = free_ports(8)
    ports = dict(zip(("--node-manager-port", "--object-manager-port", "--ray-client-server-port",
                      "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                      "--runtime-env-agent-port"), others))
    log = Path(temp) / "ray_start.log"
    with open(log, "w") as out:
        process = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                                    "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                                    f"--temp-dir={temp}", *[f"{flag}={value}" for flag, value in ports.items()]],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text():  # what `ray start --block` says once the head is up
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        HEAD.update(process=process)
        CLIENT.update(address=f"ray://127.0.0.1:{ports['--ray-client-server-port']}",
                      logs=Path(temp) / "session_latest" / "logs")
        yield f"127.0.0.1:{port}"
    finally:
        left = end_session(process)
        for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
            os.environ.pop(name, None)
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of the test's Ray head outlived it: {left}"


def normtf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "normtf", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def same_run(a: RunDir, b: RunDir) -> None:
    strip = lambda records: [{k: v for k, v in r.items() if k != "epoch_time"} for r in records]  # noqa: E731
    assert strip(a.read_history()) == strip(b.read_history())
    for x, y in zip(load_model(a.model).get_weights(), load_model(b.model).get_weights()):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_compare_on_a_ray_cluster_gives_the_local_pools_numbers(head, tmp_path):
    norms = ["--norm", "group", "--norm", "batch"]
    # A relative --runs-dir, as the README's commands give it: the Ray workers' working directory
    # is not the driver's, and the runs must land in the driver's.
    on_ray = normtf("compare", *norms, *TINY, "--cluster", head, "--runs-dir", "ray", "--img-dir", "ray/img",
                    cwd=tmp_path)
    assert on_ray.returncode == 0, on_ray.stderr
    assert f"training 2 runs, 2 at a time on the Ray cluster at {head}, 1 thread each" in on_ray.stdout
    assert (tmp_path / "ray" / "img" / "loss_accuracy.png").is_file()
    assert not (tmp_path / "ray" / cluster.TOKEN).exists()  # the driver's token goes with the grid
    local = normtf("compare", *norms, *TINY, "--jobs", "2", "--runs-dir", tmp_path / "local",
                   "--img-dir", tmp_path / "local" / "img")
    assert local.returncode == 0, local.stderr
    for norm in ("group", "batch"):
        same_run(RunDir(tmp_path / "ray" / norm), RunDir(tmp_path / "local" / norm))
    again = normtf("compare", *norms, *TINY, "--cluster", head, "--runs-dir", "ray", "--img-dir", "ray/img",
                   cwd=tmp_path)
    assert again.returncode == 0 and "training" not in again.stdout  # finished runs are reused, no task sent


@pytest.mark.slow
def test_cluster_auto_finds_the_head_through_ray_address(head, tmp_path):
    """docs/how-it-works.md's `--cluster auto`, as on a node of a cluster: the address from RAY_ADDRESS."""
    env = {**os.environ, "RAY_ADDRESS": head}
    result = subprocess.run([sys.executable, "-m", "normtf", "train", "--norm", "none", *TINY, "--seeds", "1",
                             "--cluster", "auto", "--runs-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=900, env=env)
    assert result.returncode == 0, result.stderr
    assert "on the Ray cluster at auto" in result.stdout
    assert RunDir(tmp_path / "none" / "seed-42").status() == "finished"


@pytest.mark.slow
def test_ray_client_address_trains_through_the_client_server(head, tmp_path):
    """docs/how-it-works.md's `--cluster ray://HEAD:10001`: the driver talks to the head's Ray Client
    server (here on a free port); the runs land in the driver's --runs-dir."""
    result = normtf("train", "--norm", "group", *TINY, "--seeds", "1", "--cluster", CLIENT["address"],
                    "--runs-dir", tmp_path)
    assert result.returncode == 0, result.stderr + client_server_logs()
    assert RunDir(tmp_path / "group" / "seed-42").status() == "finished"


def client_server_logs() -> str:
    """The end of the head's Ray Client server logs (the proxy's and each client's own server's): where
    the server writes why it could not serve a client."""
    return "".join(f"\n--- {path.name}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:])
                   for path in sorted(CLIENT["logs"].glob("ray_client_server*")) if path.stat().st_size)


@pytest.mark.slow
def test_cluster_local_trains_on_a_throwaway_ray(tmp_path):
    """docs/how-it-works.md's `--cluster local`, to try Ray on one machine: no head to start."""
    result = normtf("compare", "--norm", "group", "--norm", "none", *TINY, "--cluster", "local",
                    "--runs-dir", tmp_path, "--img-dir", tmp_path / "img")
    assert result.returncode == 0, result.stderr
    assert "training 2 runs, 2 at a time on a local Ray, 1 thread each" in result.stdout
    assert all(RunDir(tmp_path / norm).status() == "finished" for norm in ("group", "none"))


@pytest.mark.slow
def test_a_lost_ray_worker_is_retried_and_its_run_resumes(head, tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "normtf", "train", "--norm", "group", "--seeds", "1",
                                "--epochs", "2", "--train-size", "1500", "--test-size", "200", "--deterministic",
                                "--cluster", head, "--runs-dir", str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = RunDir(tmp_path / "group" / "seed-42")
    deadline = time.time() + 300
    while not (run.history.exists() and run.lock_file.exists() and run.lock_file.read_text().strip()):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.05)
    kill_descendant(int(run.lock_file.read_text()), HEAD["process"])  # the Ray worker training it, in epoch 2
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert [r["epoch"] for r in run.read_history()] == [1, 2]  # resumed, not started over
    assert run.status() == "finished"


def test_an_address_where_no_cluster_answers_fails_at_once_and_says_so(tmp_path):
    """A mistyped --cluster address: Ray alone retries a GCS address for over ten minutes in silence;
    normtf says at once that nothing answers there, with no traceback, and writes no run."""
    address = f"127.0.0.1:{free_port()}"  # free: nothing listens there
    started = time.monotonic()
    result = normtf("train", "--norm", "group", *TINY, "--seeds", "1", "--cluster", address, "--runs-dir", tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"could not reach a Ray cluster at '{address}': nothing answers at {address}" in result.stderr
    assert "ray start --head" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120 and not list(tmp_path.iterdir())
    client = f"ray://127.0.0.1:{free_port()}"  # a Ray Client address: the same check, before Ray's own
    with pytest.raises(NormtfError, match=f"at '{client}': nothing answers at 127.0.0.1:"):
        cluster.run([], [], [], client, None, Options(), None, print)


def test_a_ray_client_servers_failure_is_named_in_one_line():
    """The Ray Client server sends back a traceback; the user sees its first line and its own error."""
    sent = ("Initialization failure from server:\nTraceback (most recent call last):\n  File \"proxier.py\", "
            "line 760, in Datapath\n    raise RuntimeError(\nRuntimeError: Proxy failed to Connect to backend! "
            "Check `ray_client_server.err`\n")
    assert cluster._reason(ConnectionError(sent)) == ("Initialization failure from server: RuntimeError: Proxy "
                                                      "failed to Connect to backend! Check `ray_client_server.err`")
    assert cluster._reason(ConnectionError("one line")) == "one line"


def test_a_client_server_that_lost_its_server_at_birth_is_asked_once_more(monkeypatch):
    """Ray's client server loses the server it starts for a driver now and then (once in four slow
    tiers here): the driver asks once more; twice lost is an error that says so, in one line."""
    import ray

    calls = []

    def init(**kwargs):
        calls.append(kwargs["address"])
        if len(calls) <= failures:
            raise ConnectionError(f"Initialization failure from server:\nTraceback ...\nRuntimeError: "
                                  f"{cluster.CLIENT_SERVER_LOST}. See ray_client_server_23000.err for detailed logs.")
        raise ValueError("connected")  # where the grid would start: this test stops here

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(cluster, "_answers", lambda address: None)
    for failures, said in ((1, "connected"), (2, cluster.CLIENT_SERVER_LOST)):
        calls.clear()
        with pytest.raises(NormtfError, match=said):
            cluster.run([], [], [], "ray://head:10001", None, Options(), None, print)
        assert calls == ["ray://head:10001"] * 2


def test_a_worker_that_cannot_see_the_runs_dir_sends_the_run_back(tmp_path, dataset, monkeypatch):
    """The task as a Ray worker on another machine runs it: the driver's token is not where it
    looks, so it trains in a scratch directory and returns the files, which the driver writes."""
    monkeypatch.setattr(quiet, "start_tensorflow", lambda: None)  # this process's TensorFlow is running

    class Events:
        def __init__(self):
            self.items = []

        def put(self, item):
            self.items.append(item)

    config = TrainConfig(norm="group", epochs=1, train_size=256, test_size=200)
    job = RunSpec(config, tmp_path / "runs", False, "group")
    events = Events()
    kind, result, files = cluster._task(0, job, Options(), 1, (str(tmp_path / "elsewhere" / cluster.TOKEN), "x"),
                                        events)
    assert kind == "files" and not job.run.path.exists()  # trained elsewhere
    assert not Path(result.run.path).exists()  # the scratch directory is gone
    assert {"config.json", "history.json", "history.csv", "metrics.json", "model.keras"} <= set(files)
    assert [e[0] for e in events.items][:2] == ["begin", "step"] and events.items[-1][0] == "epoch"
    written = cluster._write_back(job, result, files)
    assert written.run.path == job.run.path and job.run.status(config) == "finished"
    assert evaluate_file(job.run.model, dataset, 200).accuracy == pytest.approx(written.metrics["final_test_accuracy"])
