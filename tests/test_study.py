"""docs/study.md, the study in our words: its network table is the network normtf builds, layer by
layer, and its reported numbers are the reference rows docs/results.md compares with."""

import re
from pathlib import Path

import pytest

from normtf.models import build_model, trainable_params as trainable

ROOT = Path(__file__).parent.parent
STUDY = (ROOT / "docs" / "study.md").read_text()


def section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}\n")[1].split("\n## ")[0]


def rows(text: str) -> list[list[str]]:
    """The cells of every table row in `text`, header and rule left out."""
    lines = [line for line in text.splitlines() if line.startswith("|") and not line.startswith("| ---")]
    return [[cell.replace("*", "").strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def number(cell: str) -> int:
    return int(cell.split(":")[0].replace(",", ""))


@pytest.fixture(scope="module")
def built():
    return {norm: build_model(norm) for norm in ("batch", "group", "layer")}


def test_the_network_table_is_the_model_normtf_builds(built):
    table = {cells[0]: cells for cells in rows(section(STUDY, "The network"))}
    names = {"transition": "transition_conv", "max-pool": "pool", "head": "head",
             **{f"block {i}": f"block{i}_conv" for i in range(1, 7)}}
    assert set(table) == {*names, "total"}
    for row, name in names.items():
        _, _, shape, conv, norm, layer_norm = table[row]
        model = built["group"]
        assert number(conv) == trainable(model.get_layer(name)), row
        *hw, c = model.get_layer(name).output.shape[1:]  # channels last; the table's are channels first
        assert shape == "×".join(map(str, [c, *hw])), row
        if row.startswith("block"):
            norm_name = name.replace("_conv", "_norm")
            assert number(norm) == trainable(built["batch"].get_layer(norm_name)) \
                == trainable(built["group"].get_layer(norm_name)), row
            assert number(layer_norm) == trainable(built["layer"].get_layer(norm_name)), row
    _, _, _, conv, norm, layer_norm = table["total"]
    assert number(conv) + number(norm) == trainable(built["group"]) == trainable(built["batch"]) == 9_910
    assert number(conv) + number(layer_norm) == trainable(built["layer"]) == 66_974
    assert [f"{n:,} in all" for n in (9_910, 66_974)] == re.findall(r"[\d,]+ in all", f"{norm} {layer_norm}")


def test_the_reported_numbers_are_the_reference_rows_of_docs_results():
    reported = rows(section(STUDY, "What it reported").split("\n\n")[1])
    results = (ROOT / "docs" / "results.md").read_text()
    assert [cells[0] for cells in reported] == ["`layer`", "`batch-l1`", "`group`"]
    for variant, *cells in reported:
        assert f"| {variant} | reference | {' | '.join(cells)} |" in results
