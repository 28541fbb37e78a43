"""`normtf bench`: normtf's training speed against the reference PyTorch loop, on this machine.

Every measurement runs in its own process (`python -m normtf.bench --worker SPEC`), so that its
peak memory is its own and TensorFlow and PyTorch never share a process. For each variant the two
processes warm up, then take turns: a window of `steps` training steps in normtf while PyTorch
waits, then one in PyTorch while normtf waits, `repeats` times. Interleaved, a change in the
machine's speed (another tenant, a turbo state) hits both sides of the ratio alike; measured one
after the other, the reference's median moved by 30% between two runs. The report gives each
side's median window. How far an epoch is from what the hardware allows is measured against a
FLOP floor: the model's training FLOPs at the machine's best float32 matmul rate. The epoch a user
waits for is measured too, by running `normtf train` itself (data pipeline, callbacks and the
test-set evaluation included), alone on the machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.table import Table

from normtf.config import TrainConfig
from normtf.console import COMPACT
from normtf.errors import NormtfError, UsageError
from normtf.files import write_json
from normtf.runs import code_version

EPOCH_IMAGES = 60_000  # one epoch of MNIST's training set
# (warm-up steps, timed steps per repeat). Most of a worker's time is fixed (imports, tracing), so
# quick keeps the repeats but times 10 steps and one evaluation: a rough look in under two minutes.
SETTINGS = {False: (20, 150), True: (5, 10)}


def default_norms(against: str, reference: bool) -> list[str]:
    """The variants `normtf bench` times when none is named: against PyTorch, those with a
    counterpart in torch_reference.py; otherwise every one."""
    from normtf.norms import NORMS

    return [name for name, spec in NORMS.items() if spec.pytorch or not (reference and against == "reference")]


def run_benchmark(norms: list[str], repeats: int = 5, quick: bool = False, steps: int | None = None,
                  reference: bool = True, out: Path | None = None, progress=None,
                  epoch: bool | None = None, against: str = "reference") -> dict:
    """Measure each variant in normtf and (reference=True) against `against`: the PyTorch reference
    loop, or ("keras-layers") the same normtf model built from Keras's own layers instead of
    normtf's (what normtf's layers buy); write `out` if given (the command's default is
    outputs.bench_file: beside the runs, never over the committed results/bench.json). epoch: also time a full epoch of `normtf
    train` (default: unless quick)."""
    from normtf.norms import get_norm

    say = progress or (lambda message: None)
    warmup, default_steps = SETTINGS[quick]
    steps = default_steps if steps is None else steps
    if repeats < 1 or steps < 1:
        raise UsageError(f"repeats and steps must be at least 1 (got {repeats}, {steps})")
    for norm in norms:
        get_norm(norm)
    if against not in AGAINST:
        raise UsageError(f"unknown --against {against!r}; choose one of: {', '.join(AGAINST)}")
    unmatched = [norm for norm in norms if not get_norm(norm).pytorch]
    if reference and against == "reference" and unmatched:
        raise UsageError(f"{', '.join(unmatched)}: no PyTorch counterpart (only the study's variants have one); "
                         "time against normtf's Keras-layer build with --against keras-layers")
    if reference and against == "reference" and importlib.util.find_spec("torch") is None:
        raise NormtfError("PyTorch is not installed: pip install -e '.[bench]' (torch==2.13.0), "
                          "or run with --no-reference")
    window = {"steps": steps, "warmup": warmup, "repeats": repeats}
    epoch = not quick if epoch is None else epoch
    settings = {**window, "evals": 1 if quick else repeats, "quick": quick, "reference": reference,
                "batch_size": TrainConfig().batch_size, "train_epochs": TRAIN_EPOCHS if epoch else 0,
                "against": against if reference else None}
    load = os.getloadavg()[0]
    if load >= 1:
        say(f"warning: the machine is busy (load average {load:.1f}); every number will be low, "
            "PyTorch's most (its threads spin-wait for cores another process holds)")

    say("measuring the float32 matmul peak")
    gflops = _Worker("peak").result()["gflops"]
    variants = {}
    for norm in norms:
        say(f"{norm}: {warmup} warm-up steps, then {repeats} x {steps} steps"
            + (f" in normtf and {AGAINST[against]} by turns" if reference else "") + ", then evaluation")
        ours = _Worker("normtf", norm=norm, evals=settings["evals"], **window)
        theirs = None
        if reference:
            theirs = (_Worker("torch", norm=norm, **window) if against == "reference" else
                      _Worker("normtf", norm=norm, evals=settings["evals"], keras_layers=_keras_layers(against),
                              **window))
        workers = [w for w in (ours, theirs) if w]
        try:
            for _ in range(repeats):
                for worker in workers:
                    worker.wait_ready()  # both warmed up (or done): nothing else runs during a window
                for worker in workers:
                    worker.run_window()
            ours.run_window()  # the evaluations, after the reference has finished
            if theirs and theirs.kind == "normtf":
                theirs.run_window()  # Keras's layers' evaluations, after ours
            variants[norm] = _summarize(ours.result(), theirs.result() if theirs else None, gflops)
        finally:
            for worker in workers:
                worker.stop()  # a worker left waiting when the other failed (or on Ctrl-C)
        if epoch:
            say(f"{norm}: {TRAIN_EPOCHS} epochs of normtf train on the full training set")
            variants[norm]["train"] = _summarize_epochs(train_epochs(norm), variants[norm]["floor_epoch_seconds"])

    result = {
        "normtf": code_version(),  # the code measured: a commit, and whether files differed from it
        "machine": {"cpu_count": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
                    "python": platform.python_version(), "tensorflow": _version("tensorflow"),
                    "keras": _version("keras"), "torch": _version("torch"),
                    "load_average": load, "matmul_gflops": gflops},
        "settings": settings,
        "variants": variants,
    }
    if out is not None:
        write_json(Path(out), result)
    return result


def _summarize(ours: dict, theirs: dict | None, gflops: float) -> dict:
    speed = statistics.median(ours["images_per_second"])
    epoch = EPOCH_IMAGES / speed
    floor = EPOCH_IMAGES * ours["flops_per_image"] / (gflops * 1e9)
    reference = None
    if theirs is not None:
        reference = {"images_per_second": statistics.median(theirs["images_per_second"]),
                     "images_per_second_all": theirs["images_per_second"],
                     "peak_rss_mib": theirs["peak_rss_mib"]}
        if "eval_seconds" in theirs:
            reference.update(eval_seconds=statistics.median(theirs["eval_seconds"]), eval_seconds_all=theirs["eval_seconds"])
    return {
        "normtf": {"images_per_second": speed, "images_per_second_all": ours["images_per_second"],
                   "peak_rss_mib": ours["peak_rss_mib"], "eval_seconds": statistics.median(ours["eval_seconds"]),
                   "eval_seconds_all": ours["eval_seconds"], "flops_per_image": ours["flops_per_image"]},
        "reference": reference,
        "ratio": speed / reference["images_per_second"] if reference else None,
        # normtf's window over the reference window that followed it: how much the ratio itself varies
        "ratio_by_window": ([a / b for a, b in zip(ours["images_per_second"], theirs["images_per_second"])]
                            if theirs else None),
        "epoch_seconds": epoch,
        "floor_epoch_seconds": floor,
        "epoch_vs_floor": epoch / floor,
    }


# What normtf is timed against (--against). The class names are normtf.model_files.OURS's, written
# out so that a bad value is refused before Keras loads (tests/test_bench.py keeps the two the same).
AGAINST = {"reference": "the PyTorch reference", "keras-layers": "the same model with Keras's layers",
           **{f"keras-{name}": f"the same model with Keras's {name}" for name in
              ("Dropout", "BatchNormalization", "GroupNormalization", "LayerNormalization")}}


def _keras_layers(against: str) -> list[str] | bool:
    """Which of normtf's layers the compared model takes from Keras: all (True), or one class."""
    return True if against == "keras-layers" else [against.removeprefix("keras-")]


TRAIN_EPOCHS = 2  # the first also traces the training and test steps; the second is the steady epoch


def train_epochs(norm: str, epochs: int = TRAIN_EPOCHS, options: tuple[str, ...] = ()) -> list[float]:
    """Each epoch's seconds, as `normtf train` records them (history.json's epoch_time: from the
    epoch's first batch to the end of its test-set evaluation), from the command itself run in a
    process of its own with its default settings. options: more `normtf train` options (tests
    train on fewer images)."""
    runs = Path(tempfile.mkdtemp(prefix="normtf-bench-"))
    command = [sys.executable, "-m", "normtf", "train", "--norm", norm, "--epochs", str(epochs),
               "--runs-dir", str(runs), *options]
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        histories = list(runs.glob("**/history.json"))
        if done.returncode or len(histories) != 1:
            raise NormtfError(f"`{' '.join(command[2:])}` failed (exit {done.returncode}):\n"
                              f"{(done.stderr or done.stdout).strip()[-2000:]}")
        return [record["epoch_time"] for record in json.loads(histories[0].read_text())]
    finally:
        shutil.rmtree(runs, ignore_errors=True)


def _summarize_epochs(seconds: list[float], floor: float) -> dict:
    return {"epoch_seconds_all": seconds, "epoch_seconds": seconds[-1], "epoch_vs_floor": seconds[-1] / floor}


def cpu_model() -> str | None:
    """The CPU's model name and widest vector extension, from /proc/cpuinfo (Linux; else what
    platform says). Which kernels are fastest depends on it: a kernel gradient that was 10% faster
    than TensorFlow's on one machine was 4x slower on an AVX-512 one (docs/speed.md)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or None
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's
    flags = fields.get("flags", "").split()
    widest = next((f for f in ("amx_tile", "avx512f", "avx2", "avx") if f in flags), None)
    return " ".join(filter(None, [fields.get("model name"), f"({widest})" if widest else None])) or None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def format_table(result: dict) -> Table:
    settings, machine = result["settings"], result["machine"]
    floor = max(v["floor_epoch_seconds"] for v in result["variants"].values())  # the same model FLOPs in every variant
    against = settings.get("against", "reference" if settings.get("reference", True) else None)  # older files: no key
    table = Table(title="Training throughput" + (f", normtf against {AGAINST[against]}" if against else "")
                  + " (median of repeats)",
                  **COMPACT, caption=(
        f"{settings['repeats']} x {settings['steps']} steps after {settings['warmup']} warm-up, batch "
        f"{settings['batch_size']}; {machine['cpu_count']} CPUs, float32 matmul peak "
        f"{machine['matmul_gflops']:.0f} GFLOP/s; ratio > 1: normtf is faster. Epoch vs FLOP floor "
        f"({floor:.2f} s): 60,000 images at the windows' rate; train epoch: the last of "
        f"{settings.get('train_epochs') or TRAIN_EPOCHS} epochs of `normtf train`, test-set evaluation included"
        + ("" if settings.get("train_epochs") else " (not measured in this run)")))
    theirs = "Keras's" if against and against != "reference" else "PyTorch"
    # Two-line headers and console.COMPACT: the table fits 80 columns.
    for column in ["variant", "normtf\nimg/s", f"{theirs}\nimg/s", "ratio", "peak RSS\nMiB", "eval 10k\ns",
                   "epoch vs\nFLOP floor", "train\nepoch"]:
        table.add_column(column, justify="left" if column.startswith(("variant", "epoch", "train")) else "right",
                         no_wrap=True)
    for norm, v in result["variants"].items():
        table.add_row(
            norm,
            f"{v['normtf']['images_per_second']:,.0f}",
            f"{v['reference']['images_per_second']:,.0f}" if v["reference"] else "-",
            f"{v['ratio']:.2f}" if v["ratio"] else "-",
            f"{v['normtf']['peak_rss_mib']:,.0f}",
            f"{v['normtf']['eval_seconds']:.2f}",
            f"{v['epoch_seconds']:.0f} s {v['epoch_vs_floor']:.1f}x",
            f"{v['train']['epoch_seconds']:.0f} s {v['train']['epoch_vs_floor']:.1f}x" if v.get("train") else "-",
        )
    return table


# --- the workers, each in its own process ----------------------------------------------------------

class _Worker:
    """One measurement process. It runs each timed phase only when told to (run_window), so that
    the parent can keep every other worker idle meanwhile, and prints its result as JSON last."""

    def __init__(self, kind: str, command: list[str] | None = None, **spec):
        """command: run this instead of the worker of `kind` (tests: a worker of known output)."""
        self.kind, self.output, self.ready = kind, [], False
        command = command or [sys.executable, "-m", "normtf.bench", "--worker", json.dumps({"kind": kind, **spec})]
        package_root = str(Path(__file__).resolve().parent.parent)  # found even when normtf is not installed
        path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}
        # stderr to a file, not a pipe: nobody reads it until the end, and a full pipe would block the worker
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True, env=env)

    def wait_ready(self) -> None:
        """Wait until the worker waits for its next timed phase (warmed up, or done with the last)."""
        if not self.ready:
            self._read_until(READY)
            self.ready = True

    def run_window(self) -> None:
        """Let the worker run its next timed phase, and wait for the phase to end."""
        self.wait_ready()
        self.proc.stdin.write(GO + "\n")
        self.proc.stdin.flush()
        self._read_until(DONE)
        self.ready = False

    def result(self) -> dict:
        # The rest of stdout through the same reader as _read_until, not communicate(): that reads
        # the pipe itself and misses lines the reader already holds (the result printed right
        # after the last "done" often arrives with it).
        if not self.proc.stdin.closed:
            self.proc.stdin.close()  # a worker still at its gate exits
        self.output += self.proc.stdout.read().splitlines()
        self.proc.wait()
        try:
            result = json.loads(self.output[-1])
        except (IndexError, ValueError):
            result = None
        if result and "error" in result:
            raise NormtfError(result["error"])
        if self.proc.returncode or result is None:
            self.errors.seek(0)
            raise NormtfError(f"the {self.kind} benchmark process failed (exit {self.proc.returncode}):\n"
                              f"{self.errors.read().strip()[-2000:]}")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _read_until(self, word: str) -> None:
        for line in self.proc.stdout:
            if line.strip() == word:
                return
            self.output.append(line)
        self.result()  # the worker ended early: raises with its error or its stderr
        raise NormtfError(f"the {self.kind} benchmark process ended before its last timed phase")


READY, GO, DONE = "ready", "go", "done"


def _gate():
    """In a worker: announce that the next timed phase can start, and start it when told."""
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        sys.exit(1)  # the parent went away


def _phase_done():
    print(DONE, flush=True)


def flops_per_image(model) -> int:
    """Training FLOPs of one image: multiply-accumulates of every conv/dense kernel at its output
    size, x2 for FLOPs, x3 for forward plus the two backward products (input and kernel gradients).
    Norms, activations and pooling are left out: they are memory-bound, not FLOP-bound."""
    macs = sum(math.prod(layer.output.shape[1:-1]) * math.prod(layer.kernel.shape)
               for layer in model.layers if hasattr(layer, "kernel"))
    return 6 * macs


def measure_normtf(norm: str, steps: int, warmup: int, repeats: int, evals: int,
                   gate=lambda: None, done=lambda: None, keras_layers: bool | list[str] = False) -> dict:
    """normtf's training step as `normtf train` runs it, then `evals` timed 10k-image evaluations.
    gate() is called before each timed phase (windows, evaluations) and done() after it.
    keras_layers: the same model, compiled the same way, with Keras's layers in place of normtf's
    (True: all of them; a list: those classes, e.g. ["Dropout"]).

    The timing callback sees what `normtf train`'s own callbacks see, once per execution of
    `steps_per_execution` steps, so the timed loop is the one training runs."""
    import keras

    from normtf import data as datasets
    from normtf.model_files import with_keras_layers
    from normtf.training import EVAL_BATCH, compile_model, prepare

    config = TrainConfig(norm=norm)
    data = datasets.load("mnist")  # the reference's dataset
    n, batch = len(data.y_train), config.batch_size
    per_epoch, total = datasets.steps_per_epoch(n, batch), warmup + repeats * steps
    model, _, _ = prepare(config, per_epoch)
    if keras_layers:
        model = compile_model(with_keras_layers(model, None if keras_layers is True else keras_layers), config,
                              model.jit_compile, model.steps_per_execution, per_epoch)
    train = datasets.train_dataset(data.x_train, data.y_train, batch, config.seed, config.rotation, 0,
                                   -(-total // per_epoch), data.mean, data.std)
    sizes = [min(batch, n - (step % per_epoch) * batch) for step in range(total + per_epoch)]  # short last batch
    windows = _Windows([warmup - 1 + k * steps for k in range(repeats + 1)], sizes, gate, done)
    model.fit(train, epochs=1, steps_per_epoch=total, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=windows)])

    test = datasets.test_dataset(data.x_test, data.y_test, data.mean, data.std, EVAL_BATCH)
    gate()
    model.evaluate(test, verbose=0)  # warm-up, not timed: traces the test step and fills the dataset cache
    eval_seconds = []
    for _ in range(evals):
        start = time.perf_counter()
        model.evaluate(test, verbose=0)
        eval_seconds.append(time.perf_counter() - start)
    done()
    return {"images_per_second": windows.rates, "eval_seconds": eval_seconds, "flops_per_image": flops_per_image(model)}


class _Windows:
    """on_train_batch_end for fit: times the steps between consecutive `boundaries` (step indices),
    calling gate() as a window opens and done() as it closes; training waits inside gate()."""

    def __init__(self, boundaries, sizes, gate, done):
        self.boundaries, self.sizes, self.gate, self.done = list(boundaries), sizes, gate, done
        self.rates, self.opened = [], None

    def __call__(self, step, logs=None):
        if not self.boundaries or step < self.boundaries[0]:
            return
        now = time.perf_counter()
        self.boundaries.pop(0)
        if self.opened is not None:
            first, start = self.opened
            self.rates.append(sum(self.sizes[first + 1:step + 1]) / (now - start))
            self.done()
        if self.boundaries:
            self.gate()
            self.opened = (step, time.perf_counter())


def measure_reference(norm: str, steps: int, warmup: int, repeats: int, gate=lambda: None, done=lambda: None) -> dict:
    from normtf import torch_reference

    return {"images_per_second": torch_reference.measure(norm, steps, warmup, repeats, gate, done)}


def matmul_gflops(seconds: float = 2.0, size: int = 2048) -> dict:
    """The machine's achievable float32 rate: the best of repeated large matmuls, the op the
    CPU kernels are tuned hardest for, so no model step can beat it."""
    import tensorflow as tf

    a, b = tf.random.normal([size, size]), tf.random.normal([size, size])
    tf.linalg.matmul(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        float(tf.linalg.matmul(a, b)[0, 0])  # reading a value waits for the product
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return {"gflops": best}


WORKERS = {"normtf": measure_normtf, "torch": measure_reference, "peak": matmul_gflops}


def _worker(spec: str) -> int:
    """Run one measurement and print its result as the last line of stdout, JSON."""
    spec = json.loads(spec)
    kind = spec.pop("kind")
    if kind != "peak":  # timed phases wait for the parent's go
        spec.update(gate=_gate, done=_phase_done)
    try:
        result = WORKERS[kind](**spec)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except NormtfError as e:
        result = {"error": str(e)}
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        sys.exit("usage: python -m normtf.bench --worker SPEC (run by `normtf bench`, not by hand)")
    sys.exit(_worker(sys.argv[2]))
