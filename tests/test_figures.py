"""The figures read at a glance: labelled ticks, legends off the data, galleries without blank space,
files and titles that name what they show."""

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from normtf import figures, study
from normtf.sweep import sweep_panels, sweep_title

ROOT = Path(__file__).parent.parent
REFERENCE = ROOT / "results" / "reference"


def drawn(figure):
    """The figure laid out and drawn, so that ticks, text and extents are final."""
    FigureCanvasAgg(figure).draw()
    return figure


def tick_labels(axis) -> list[str]:
    low, high = sorted(axis.get_view_interval())
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs())
            if t.get_text() and low <= v <= high]


def test_sweep_axes_label_every_batch_size_and_several_errors():
    summary = json.loads((ROOT / "results" / "sweep.json").read_text())
    figure = drawn(figures.sweep_figure(sweep_panels(summary), sweep_title(summary)))
    assert len(figure.axes) == 2  # every variant; the batch norms three ways
    for ax in figure.axes:
        assert tick_labels(ax.xaxis) == [str(s) for s in sorted({r["batch_size"] for r in summary["rows"]})]
        labels = tick_labels(ax.yaxis)
        assert len(labels) >= 3, labels  # was one ("5")
        assert all(float(t) > 0 for t in labels)
        legend = ax.get_legend().get_window_extent()  # under its panel, on no panel
        assert not any(legend.overlaps(other.get_window_extent()) for other in figure.axes)


@pytest.mark.parametrize("low, high", [(3.5, 8.2), (0.02, 0.9), (0.015, 0.2), (5.1, 5.9), (1e-4, 1e2)])
def test_log_ticks_give_at_least_three_labels_in_range(low, high):
    ticks = figures.log_ticks(low, high)
    assert len(ticks) >= 3 and all(low <= t <= high for t in ticks)


@pytest.mark.parametrize("last", range(1, 101))
def test_epoch_ticks_are_whole_with_first_and_last(last):
    ticks = figures.epoch_ticks(last)
    assert ticks[0] == 1 and ticks[-1] == last and ticks == sorted(set(ticks)) and len(ticks) <= 8
    assert all(isinstance(t, int) for t in ticks)


def histories(epochs: int, seeds: int, rng) -> list[list[dict]]:
    """Curves shaped like real training: accuracy climbing from ~96% in epoch 1 to ~99%."""
    out = []
    for _ in range(seeds):
        acc = 0.99 - 0.03 * np.exp(-np.arange(epochs) / 2) + rng.normal(0, 0.001, epochs)
        loss = 0.02 + 0.2 * np.exp(-np.arange(epochs) / 2) + rng.uniform(0, 0.01, epochs)
        out.append([{"test_accuracy": a, "train_accuracy": a - 0.005, "test_loss": v, "train_loss": v * 2}
                    for a, v in zip(acc, loss)])
    return out


def curves(epochs: int, seeds: int = 3):
    rng = np.random.default_rng(0)
    runs = {name: {"label": f"{name} (9,910 params, {seeds} seeds)", "color": f"C{i}",
                   "histories": histories(epochs, seeds, rng)} for i, name in enumerate(["batch-l1", "layer", "group"])}
    return drawn(figures.curves_figure(runs, "title", "lines: mean; bands: min to max"))


@pytest.mark.parametrize("epochs", [1, 2, 20])
def test_curves_legend_covers_no_data(epochs):
    figure = curves(epochs)
    legend = figure.legends[0].get_window_extent()
    for ax in figure.axes:
        assert not legend.overlaps(ax.get_window_extent())  # outside every panel...
        for line in ax.get_lines():  # ...so off every data point
            x, y = ax.transData.transform(line.get_xydata()).T
            assert not ((legend.x0 <= x) & (x <= legend.x1) & (legend.y0 <= y) & (y <= legend.y1)).any()


@pytest.mark.parametrize("epochs, expected", [(1, ["1"]), (2, ["1", "2"]), (20, ["1", "5", "10", "15", "20"])])
def test_curves_label_whole_epochs_first_and_last(epochs, expected):
    for ax in curves(epochs).axes[2:]:  # the bottom row carries the shared x labels
        assert tick_labels(ax.xaxis) == expected


def test_a_run_that_cannot_learn_leaves_the_others_readable_and_says_where_it_is():
    """`compare --all` draws instance norm, at 11% where the others end near 99%: the accuracy panels
    stay on the others' range and its legend entry gives its accuracy instead."""
    rng = np.random.default_rng(0)
    runs = {name: {"label": name, "color": f"C{i}", "histories": histories(20, 1, rng)}
            for i, name in enumerate(["group", "layer"])}
    stuck = [{"test_accuracy": 0.1135, "train_accuracy": 0.11, "test_loss": 2.301, "train_loss": 2.302}] * 20
    runs["instance"] = {"label": "instance", "color": "C2", "histories": [stuck]}
    figure = drawn(figures.curves_figure(runs, "title"))
    for ax in figure.axes:
        if "accuracy" in ax.get_title().lower():
            assert ax.get_ylim()[0] > 90
        else:
            low, high = ax.get_ylim()  # every loss is drawn, instance's too
            assert all(low <= y <= high for line in ax.get_lines() for y in line.get_ydata())
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["group", "layer", "instance; test accuracy 11.35%, below the accuracy panels"]


def test_loss_panels_say_they_are_log_scale():
    figure = curves(20)
    for ax in figure.axes:
        if "loss" in ax.get_title().lower():
            assert ax.get_yscale() == "log" and "log scale" in ax.get_ylabel()
            assert len(tick_labels(ax.yaxis)) >= 3


def test_curves_title_states_data_recipe_l1_and_seeds():
    groups = study.by_norm(study.stored_results(["batch-l1", "group"], REFERENCE))
    title = study.curves_title(groups)
    assert title.startswith("MNIST, 60,000 training images, 20 epochs of batch 128")
    assert "seeds 42, 43, 44" in title and "dropout 0.1" in title and "L1 0.0005 (batch-l1)" in title
    assert "L1" not in study.curves_title(study.by_norm(study.stored_results(["group"], REFERENCE)))


def gallery(count: int):
    images = np.random.default_rng(0).integers(0, 255, (count, 28, 28), dtype=np.uint8)
    labels = np.arange(count) % 10
    return drawn(figures.misclassified_figure(images, labels, (labels + 1) % 10, np.full(count, 0.5),
                                              "variant, seed 42: test accuracy 99.00%\nfirst n of m"))


@pytest.mark.parametrize("count, columns", [(1, 1), (3, 3), (5, 5), (10, 5)])
def test_gallery_is_as_wide_as_its_digits_up_to_five(count, columns):
    figure = gallery(count)
    used = [ax for ax in figure.axes if ax.get_images()]
    assert len(used) == count
    assert len({round(ax.get_position().x0, 3) for ax in figure.axes}) == columns
    assert figure.get_figwidth() == pytest.approx(columns * figures.GALLERY_CELL)


def title_gap(figure) -> float:
    """Pixels between the bottom of the figure's title and the top of the first row's titles."""
    renderer = figure.canvas.get_renderer()
    first_row = max(ax.title.get_window_extent(renderer).y1 for ax in figure.axes if ax.get_images())
    return figure._suptitle.get_window_extent(renderer).y0 - first_row


def test_gallery_title_spacing_does_not_grow_with_the_rows():
    short, long = gallery(5), gallery(100)
    assert 0 < title_gap(long) == pytest.approx(title_gap(short), abs=1)
    assert long.get_figheight() == pytest.approx(figures.GALLERY_HEADER + 20 * figures.GALLERY_ROW)
    largest = figures.GALLERY_HEADER + figures.MAX_GALLERY_IMAGES // 5 * figures.GALLERY_ROW
    assert largest * figures.DPI < 2**16  # Agg's limit on a side


@pytest.mark.slow
def test_gallery_files_are_named_after_the_variant_and_titles_name_the_seed(tmp_path, monkeypatch):
    titles = {}
    draw = figures.plot_misclassified
    monkeypatch.setattr(figures, "plot_misclassified",
                        lambda *args: titles.setdefault(args[4].name, args[5]) and draw(*args))
    results = study.stored_results(["batch-l1", "batch"], REFERENCE)
    paths = study.gallery(results, tmp_path, count=3)
    assert sorted(p.name for p in paths) == ["misclassified_batch-l1.png", "misclassified_batch.png"]
    assert all(p.is_file() for p in paths)
    for result in results:  # the first seed's run, titled with its stored numbers
        accuracy, seed = result.metrics["final_test_accuracy"], sorted(r.config.seed for r in results
                                                                       if r.config.norm == result.config.norm)[0]
        if result.config.seed == seed:
            wrong = round((1 - accuracy) * 10_000)
            assert titles[f"misclassified_{result.config.norm}.png"] == (
                f"{result.config.norm}, seed {seed}: test accuracy {100 * accuracy:.2f}%\n"
                f"first 3 of its {wrong} misclassified MNIST test images")


@pytest.mark.parametrize("groups", ["0", "3", "99"])
def test_diagrams_refuse_group_counts_the_model_cannot_take(tmp_path, groups):
    from typer.testing import CliRunner

    from normtf.cli import app
    from normtf.config import valid_groups

    result = CliRunner().invoke(app, ["diagrams", "--groups", groups, "--img-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0 and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))
    help_text = " ".join(CliRunner().invoke(app, ["diagrams", "--help"]).output.split())
    assert f"({' or '.join(map(str, valid_groups()))})" in help_text  # --help names the valid counts
