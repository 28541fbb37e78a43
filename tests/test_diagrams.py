"""The cube figures: each kind renders a PNG, and the shaded cells are the set that shares one mean."""

import pytest

from normtf.diagrams import draw_diagram, draw_diagrams, shaded_cells

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_batch_shades_one_channel_across_all_samples():
    cells = shaded_cells("batch", n=6, c=6, groups=2)
    assert len(cells) == 6
    assert len({ch for _, ch in cells}) == 1


def test_layer_shades_one_sample_across_all_channels():
    cells = shaded_cells("layer", n=6, c=8, groups=2)
    assert len(cells) == 8
    assert len({s for s, _ in cells}) == 1


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_shades_one_group_of_one_sample(groups):
    cells = shaded_cells("group", n=6, c=6, groups=groups)
    assert len(cells) == 6 // groups
    assert len({s for s, _ in cells}) == 1
    assert sorted(ch for _, ch in cells) == list(range(6 // groups))  # adjacent channels: one group


def test_instance_shades_one_channel_of_one_sample():
    assert shaded_cells("instance", n=6, c=6, groups=2) == {(0, 0)}


@pytest.mark.parametrize("kind, groups", [("weight", 2), ("group", 4), ("group", 0)])
def test_bad_kind_or_groups_raise(kind, groups):
    with pytest.raises(ValueError):
        shaded_cells(kind, n=6, c=6, groups=groups)


def test_draw_diagram_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError):
        draw_diagram("weight", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_draw_diagrams_writes_wu_and_hes_four_pngs_of_the_same_size(tmp_path):
    paths = draw_diagrams(tmp_path / "img")
    assert [p.name for p in paths] == ["BatchNorm.png", "LayerNorm.png", "InstanceNorm.png", "GroupNorm.png"]
    sizes = set()
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert 10_000 < len(data) < 500_000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert 500 < width < 900 and 500 < height < 900  # ~4.5 in at 150 dpi
        sizes.add((width, height))
    assert len(sizes) == 1  # they sit side by side in the README
    assert not list((tmp_path / "img").glob(".*.tmp"))  # atomic_write left no temporary file


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_counts_dividing_the_channels_drawn_draw(tmp_path, groups):
    assert draw_diagram("group", tmp_path / "g.png", groups=groups).read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("groups", [0, 4, 99])
def test_group_counts_not_dividing_the_channels_drawn_are_refused(tmp_path, groups):
    with pytest.raises(ValueError, match="channels drawn"):
        draw_diagram("group", tmp_path / "g.png", groups=groups)
    assert not (tmp_path / "g.png").exists()
