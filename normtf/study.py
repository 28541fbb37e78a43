"""The comparison itself: train several variants (and seeds) under one recipe, then draw them."""

from __future__ import annotations

from pathlib import Path

from normtf import data
from normtf import figures
from normtf import grid
from normtf.job import Options, RunSpec
from normtf.config import TrainConfig
from normtf.errors import CorruptFile, NormtfError, RunFailed
from normtf.gallery import draw_gallery, gallery_path
from normtf.norms import color, get_norm
from normtf.runs import RunDir, dataset_dir
from normtf.training import TrainResult, preflight


def compare(norms: list[str], config: TrainConfig | dict[str, TrainConfig], runs_dir: Path,
            seeds: list[int] | None = None, callbacks_for=lambda config: (), force: bool = False,
            data_dir: Path | None = None, tensorboard: bool = False, warn=lambda message: None, jobs: int | None = 1,
            cluster: str | None = None, show: bool = False, img_dir: Path | None = None) -> list[TrainResult]:
    """Train each variant under `config` (or its own, config[norm]: --recipe best), once per seed if
    `seeds`, reusing finished runs with the same settings: `jobs` at a time (None: as many as the
    machine holds), or on the Ray cluster at `cluster` (normtf.grid). Every run is checked before the
    first one starts. With `img_dir`, each variant's first run draws its gallery there as soon as it
    is trained (gallery() draws the rest)."""
    own = config if isinstance(config, dict) else dict.fromkeys(norms, config)
    configs = [preflight(own[norm].replace(norm=norm, seed=seed), runs_dir, bool(seeds), force)
               for norm in norms for seed in seeds or [own[norm].seed]]
    firsts = {c.norm: c.seed for c in reversed(configs)}
    runs = [RunSpec(c, Path(runs_dir), bool(seeds), f"{c.norm} seed {c.seed}" if seeds else c.norm,
                    gallery_path(img_dir, c.norm) if img_dir is not None and firsts[c.norm] == c.seed else None)
            for c in configs]
    options = Options(force=force, tensorboard=tensorboard, data_dir=data_dir)
    return grid.run(runs, jobs, cluster, options, callbacks_for, show, warn)


def raise_if_failed(results: list[TrainResult]) -> None:
    """After every run had its turn: RunFailed naming the runs that ended failed, if any; else a
    NormtfError naming the runs another normtf process was training (theirs to finish)."""
    failed = [r for r in results if r.metrics.get("status") == "failed"]
    if failed:
        raise RunFailed(f"{len(failed)} of {len(results)} runs failed: " + "; ".join(
            f"{r.run.path} ({r.metrics['failure']['reason']})" for r in failed))
    busy = [r for r in results if r.metrics.get("status") == "busy"]
    if busy:
        raise NormtfError(f"{len(busy)} of {len(results)} runs were being trained by another normtf process: "
                          + ", ".join(str(r.run.path) for r in busy) + "; run the same command again once it has "
                          "finished, to draw them all")


def by_norm(results: list[TrainResult]) -> dict[str, list[TrainResult]]:
    """Results grouped by variant, in the order they came."""
    groups: dict[str, list[TrainResult]] = {}
    for result in results:
        groups.setdefault(result.config.norm, []).append(result)
    return groups


def load_result(run: RunDir, warn=lambda message: None) -> TrainResult | None:
    """A finished or failed run as stored, or None if there is nothing usable."""
    try:
        config, metrics = run.stored_config(), run.read_metrics()
        if config is None or metrics is None:
            return None
        return TrainResult(run, config, run.read_history(), metrics, reused=True)
    except CorruptFile as e:
        warn(str(e))
        return None


def stored_results(norms: list[str], runs_dir: Path, dataset: str = data.DEFAULT,
                   warn=lambda message: None) -> list[TrainResult]:
    """The stored runs of these variants on `dataset`: <runs-dir>/<norm>/, else its seed-<s>/ runs
    (under <runs-dir>/<dataset>/ for a dataset other than MNIST)."""
    results, directory = [], dataset_dir(runs_dir, dataset)
    for norm in norms:
        single = load_result(RunDir(directory / norm), warn)
        seeded = [load_result(RunDir(p), warn) for p in sorted((directory / norm).glob("seed-*"))]
        results += [single] if single else [r for r in seeded if r]
    if not results:
        flag = "" if dataset == data.DEFAULT else f" --dataset {dataset}"
        raise NormtfError(f"no trained {data.DATASETS[dataset].title} run in {directory} for {', '.join(norms)}; "
                          f"train first: normtf compare --all{flag} (or normtf train --norm <norm>{flag})")
    return results


def curves_title(groups: dict[str, list[TrainResult]]) -> str:
    """The one title of every curves figure: the data and the recipe, L1 named with the variants
    that use it, the seeds."""
    c = next(iter(groups.values()))[0].config
    seeds = sorted({r.config.seed for group in groups.values() for r in group})
    size = f"{c.train_size:,}" if c.train_size else "60,000"
    first = (f"{data.DATASETS[c.dataset].title}, {size} training images, {c.epochs} epoch{'s' if c.epochs != 1 else ''} of batch {c.batch_size}, rotation ±{c.rotation:g}°, "
             f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}\n")
    if own_recipes(groups):
        return first + f"SGD momentum {c.momentum:g}, each variant's own recipe (in the legend)"
    lr = f"lr {c.lr:g}" if c.schedule == "constant" else f"{c.schedule} lr (peak {c.lr:g})"
    with_l1 = {norm: group[0].config.l1 for norm, group in groups.items() if get_norm(norm).l1}
    l1 = "".join(f", L1 {value:g} ({norm})" for norm, value in with_l1.items())
    return first + f"SGD {lr}, momentum {c.momentum:g}, dropout {c.dropout:g}{l1}"


def own_recipes(groups: dict[str, list[TrainResult]]) -> bool:
    """Whether the variants were trained under recipes of their own (--recipe best), not one recipe."""
    return len({(g[0].config.lr, g[0].config.schedule, g[0].config.dropout) for g in groups.values()}) > 1


def recipe_label(config: TrainConfig) -> str:
    """A variant's own recipe in a legend: lr 0.0443 one-cycle, dropout 0.16, L1 1.2e-05."""
    l1 = f", L1 {config.l1:.2g}" if config.l1 is not None and get_norm(config.norm).l1 else ""
    return f"lr {config.lr:.3g} {config.schedule}, dropout {config.dropout:.2g}{l1}"


def draw_curves(results: list[TrainResult], path: Path) -> Path | None:
    """All finished variants on shared axes; with several seeds, their mean and min-max band."""
    groups = by_norm([r for r in results if r.metrics.get("status") == "finished"])
    if not groups:
        return None
    runs, own = {}, own_recipes(groups)
    for norm, group in groups.items():
        seeds = f", {len(group)} seeds" if len(group) > 1 else ""
        recipe = f"; {recipe_label(group[0].config)}" if own else ""
        runs[norm] = {"label": f"{norm} ({group[0].metrics['trainable_params']:,} params{seeds}{recipe})",
                      "color": color(norm), "histories": [r.history for r in group]}
    several = any(len(group) > 1 for group in groups.values())
    return figures.plot_curves(runs, path, curves_title(groups),
                               "lines: mean over the seeds; bands: lowest to highest seed" if several else None)


def gallery(results: list[TrainResult], img_dir: Path, count: int = 10, data_dir: Path | None = None,
            warn=lambda message: None) -> list[Path]:
    """For each variant's (first) finished run, the first `count` misclassified test images as a grid,
    img_dir/misclassified_<variant>.png (at most figures.MAX_GALLERY_IMAGES of them); a run the grid
    drew right after training it (TrainResult.gallery) is not drawn again."""
    finished = [group[0] for group in by_norm([r for r in results if r.metrics.get("status") == "finished"]).values()]
    todo = [result for result in finished if result.gallery is None]
    dataset = data.load(todo[0].config.dataset, data_dir, warn=warn) if todo else None
    return [result.gallery or draw_gallery(result, dataset, gallery_path(img_dir, result.config.norm), count)
            for result in finished]
