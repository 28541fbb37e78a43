"""A grid on a real Ray cluster (`--cluster`): a head started with `ray start --head` on free
loopback ports, `normtf compare` sent to its address, the same numbers as the local pool's; a job
stopped by someone else retried and resumed, lost twice failed; Ctrl-C once and twice; and a driver
whose runs directory the workers cannot see (a mount namespace of its own), its runs sent back."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")

from normtf import cluster  # noqa: E402
from normtf.data import default_cache_dir  # noqa: E402
from normtf.errors import NormtfError  # noqa: E402
from normtf.evaluation import load_model  # noqa: E402
from normtf.job import Options  # noqa: E402
from normtf.runs import RunDir  # noqa: E402
from processes import default_handling, end_session, kill_descendant  # noqa: E402

RAY = str(Path(sys.executable).parent / "ray")
TINY = ["--epochs", "1", "--train-size", "512", "--test-size", "200", "--deterministic"]
# Two epochs of 1,500 images: time to stop a run inside epoch 2.
LONGER = ["--epochs", "2", "--train-size", "6000", "--test-size", "200", "--deterministic"]
CLIENT = {}  # the head's Ray Client address, ray://127.0.0.1:<port>, and its logs directory
HEAD = {}  # the head's `ray start --block` process (the Ray workers and their jobs descend from it)
# and its workers' temp dir (TMPDIR), where their tasks' scratch directories go


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
    workers_temp = Path(temp) / "tmp"  # the workers' own, so that the tests see only their scratch directories
    workers_temp.mkdir()
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
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "TMPDIR": str(workers_temp)})
    try:
        deadline = time.monotonic() + 180
        while "block forever" not in log.read_text():  # what `ray start --block` says once the head is up
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        HEAD.update(process=process, temp=workers_temp)
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


class Command:
    """`normtf ...` in the background, as a user starts it from a terminal (the signals the test sends
    at their default handling), its output read line by line as it comes (`args` may start with
    a wrapper: `unshare ... --`)."""

    def __init__(self, *args, wrapper=()):
        self.process = subprocess.Popen([*wrapper, sys.executable, "-m", "normtf", *map(str, args)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        preexec_fn=default_handling(signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=lambda stream=stream, lines=lines: lines.extend(stream), daemon=True)
                        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    def wait_for(self, condition, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None and time.monotonic() < deadline, self.said()
            time.sleep(0.05)

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.out + self.err)

    def end(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        for reader in self.readers:
            reader.join()
        return code

    def said(self) -> str:
        return "".join(self.out) + "".join(self.err)


def jobs_on_the_head() -> list:
    """The job processes (normtf.job) the test's Ray head runs now: each a descendant of it (its raylet's
    worker's child)."""
    import psutil

    found = []
    for process in psutil.Process(HEAD["process"].pid).children(recursive=True):
        try:
            if "normtf.job" in process.cmdline() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def scratch_left(wait: float = 10) -> list[str]:
    """The tasks' scratch directories left in the workers' temp dir, after up to `wait` seconds for a
    stopped job to remove its own."""
    deadline = time.monotonic() + wait
    while (left := sorted(p.name for p in HEAD["temp"].glob(f"{cluster.SCRATCH}*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def epochs_done(run: RunDir) -> int:
    try:
        return len(json.loads(run.history.read_text()))
    except (OSError, ValueError):
        return 0


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
    for norm in ("group", "batch"):
        run = RunDir(tmp_path / "ray" / norm)
        assert (tmp_path / "ray" / "img" / f"misclassified_{norm}.png").is_file()  # drawn by its task, sent back
        assert not run.lock_file.exists()  # the driver held it, and let it go
        # Its job shares a GPU as the local pool's do: memory growth on (GPUs or not, as here).
        assert json.loads(run.config.read_text())["environment"]["gpu_memory_growth"] is True
    assert scratch_left() == []
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
def test_a_job_stopped_by_someone_else_is_retried_and_resumes_and_lost_twice_its_run_fails(head, tmp_path):
    """`kill PID` (SIGTERM) to the job training a run: its task raises JobLost, which Ray retries like a
    lost worker, and the retry resumes after the kept epoch. Its Ray worker then SIGKILLed (a second
    loss): the run fails in one line, the other run goes on, exit 3; the same command resumes it. One
    task at a time (--jobs 1), so that the job training `group` is the only one."""
    args = ["compare", "--norm", "group", "--norm", "none", *LONGER, "--jobs", "1", "--cluster", head,
            "--runs-dir", tmp_path, "--img-dir", tmp_path / "img"]
    command = Command(*args)
    group = RunDir(tmp_path / "group")
    command.wait_for(lambda: epochs_done(group) >= 1 and len(jobs_on_the_head()) == 1)
    first = jobs_on_the_head()[0]
    kill_descendant(first.pid, HEAD["process"], signal.SIGTERM)
    command.wait_for(lambda: command.saw("group: resuming after epoch 1 of 2"))
    retry = jobs_on_the_head()[0]
    assert retry.pid != first.pid
    kill_descendant(retry.parent().pid, HEAD["process"], signal.SIGKILL)  # its Ray worker: lost again
    assert command.end() == 3, command.said()
    assert ("group: its process was stopped (SIGTERM, not by this command) after 1 of 2 epochs; Ray runs it again"
            in command.said())
    assert any(line.startswith("group: failed: its Ray worker was lost") for line in command.out), command.said()
    assert "1 of 2 runs failed" in command.said() and "Traceback" not in command.said()
    assert RunDir(tmp_path / "none").status() == "finished"  # the other run went on
    assert group.status() == "partial" and not group.lock_file.exists()

    again = normtf(*args)
    assert again.returncode == 0, again.stderr
    assert "group: resuming after epoch 1 of 2" in again.stdout
    assert [r["epoch"] for r in group.read_history()] == [1, 2] and group.status() == "finished"
    assert scratch_left() == []


@pytest.mark.slow
def test_ctrl_c_stops_the_tasks_in_one_line_and_a_second_one_ends_at_once(head, tmp_path):
    """Ctrl-C to the driver: every task stops its job, which keeps its finished epochs; one line, exit
    130, no job left, no lock. Again on the resumed grid, twice: the tasks are force-cancelled and the
    driver ends at once; their jobs stop, their scratch directories go."""
    args = ["compare", "--norm", "group", "--norm", "none", *LONGER, "--cluster", head, "--runs-dir", tmp_path,
            "--img-dir", tmp_path / "img"]
    group = RunDir(tmp_path / "group")
    command = Command(*args)
    command.wait_for(lambda: epochs_done(group) >= 1)
    command.process.send_signal(signal.SIGINT)
    assert command.end(timeout=120) == 130, command.said()
    assert re.fullmatch(r"interrupted: [01] of 2 runs are finished; the unfinished ones keep their finished epochs; "
                        r"run the same command again to resume them", command.err[-1].strip()), command.said()
    assert "Traceback" not in command.said() and epochs_done(group) == 1  # kept, and not trained on
    assert not group.lock_file.exists() and not RunDir(tmp_path / "none").lock_file.exists()
    deadline = time.monotonic() + 10
    while jobs_on_the_head() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert jobs_on_the_head() == []

    command = Command(*args)
    command.wait_for(lambda: command.saw("group: resuming after epoch 1 of 2"))
    command.process.send_signal(signal.SIGINT)
    command.process.send_signal(signal.SIGINT)  # don't wait: the tasks are force-cancelled
    started = time.monotonic()
    assert command.end(timeout=60) == 130 and time.monotonic() - started < 10, command.said()
    assert command.err[-1].startswith("interrupted: ") and "Traceback" not in command.said()
    deadline = time.monotonic() + 20
    while jobs_on_the_head() and time.monotonic() < deadline:  # each job, its worker gone, stops
        time.sleep(0.2)
    assert jobs_on_the_head() == []
    assert scratch_left() == [] and epochs_done(group) >= 1


def in_a_mount_namespace(driver: Path, seen: Path) -> list[str]:
    """A wrapper for the driver's command: a mount namespace of its own (`unshare`, root only), where
    `seen` shows what `driver` holds. The Ray workers, outside it, see `seen` as it is (empty): a
    driver on a machine whose disk they do not share."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'mount --bind "{driver}" "{seen}" && exec "$@"', "sh"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a mount namespace needs root and unshare")
def test_without_a_shared_disk_runs_come_back_whole_resume_and_two_commands_train_each_once(head, tmp_path):
    """The driver's --runs-dir and --data-dir are in a mount namespace the workers cannot see. Its
    tasks train in scratch directories and send the runs back; interrupted, the finished epochs come
    back too, and the same command resumes there; run by two commands at once, each run is trained
    once, and comes back whole: model, history, metrics and config in, the stale checkpoint out. The
    workers' dataset is their own cache's, with one warning. No scratch directory is left."""
    driver, seen = tmp_path / "driver", tmp_path / "seen"
    (driver / "runs").mkdir(parents=True)
    seen.mkdir()
    shutil.copytree(default_cache_dir("mnist"), driver / "data")  # MNIST, here only: the workers lack this --data-dir
    args = ["--seeds", "1", *LONGER, "--cluster", head, "--runs-dir", seen / "runs", "--data-dir", seen / "data",
            "--img-dir", seen / "runs" / "img"]
    wrapper = in_a_mount_namespace(driver, seen)
    group, none = (RunDir(driver / "runs" / norm / "seed-42") for norm in ("group", "none"))

    command = Command("compare", "--norm", "group", *args, wrapper=wrapper)
    command.wait_for(lambda: command.saw("group seed 42 epoch  1/2"))
    command.process.send_signal(signal.SIGINT)
    assert command.end(timeout=120) == 130, command.said()
    warning = f"--data-dir {seen / 'data'} is not on the Ray worker at {socket.gethostname()}"
    assert sum(warning in line for line in command.err) == 1, command.said()
    assert [r["epoch"] for r in group.read_history()] == [1]  # its finished epoch came back
    assert group.checkpoint(1).is_file() and not group.lock_file.exists()
    assert not any(seen.iterdir())  # the workers never saw the driver's runs

    commands = [Command("compare", "--norm", "group", "--norm", "none", *args, wrapper=wrapper) for _ in range(2)]
    codes = [c.end() for c in commands]
    said = "".join(c.said() for c in commands)
    assert set(codes) <= {0, 1} and "Traceback" not in said, said
    for code, c in zip(codes, commands):  # 1: a run was the other command's ("busy")
        assert code == 0 or "were being trained by another normtf process" in c.said(), said
    trained = [line.split(":")[0] for c in commands for line in c.out if ": finished, test accuracy" in line]
    assert sorted(trained) == ["group seed 42", "none seed 42"], said  # each once, by one command or the other
    assert "group seed 42: resuming after epoch 1 of 2" in said
    for run in (group, none):
        assert [r["epoch"] for r in run.read_history()] == [1, 2] and run.status() == "finished"
        assert sorted(p.name for p in run.path.iterdir()) == ["config.json", "history.csv", "history.json",
                                                             "metrics.json", "model.keras"]
        assert json.loads(run.config.read_text())["data"]["origin"] == "cache"
    assert (driver / "runs" / "img" / "misclassified_group.png").is_file()
    assert scratch_left() == []


def test_an_address_where_no_cluster_answers_fails_at_once_and_says_so(tmp_path, monkeypatch):
    """A mistyped --cluster address: Ray alone retries a GCS address for over ten minutes in silence;
    normtf says at once that nothing answers there, with no traceback, and writes no run. The same
    for a Ray Client address, and for auto where RAY_ADDRESS names the address (as Ray reads it)."""
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
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(NormtfError, match=f"at 'auto' \\(RAY_ADDRESS={address}\\): nothing answers at {address}"):
        cluster.run([], [], [], "auto", None, Options(), None, print)


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
