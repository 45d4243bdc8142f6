"""Grid expansion: cells, stable ids, per-scale values, command-line axes, and the one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lrexp.config.load import load

from lrexp.grid.expand import Cell, cell_config, config_hash, expand, write_cell
from lrexp.grid.spec import GridError
from lrexp.model.variants import row_name


def write(tmp_path: Path, name: str, data: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


BASE = {"scale": "smoke", "model.recurrent.layers": [-3]}


def test_product_ids_groups_and_order(tmp_path):
    g = expand(write(tmp_path, "g", {
        "base": BASE,
        "axes": {"model.recurrent.topology": ["dual", "skip"], "model.recurrent.gate": ["lstm", "fixed"]},
        "seeds": [0, 1],
    }))
    assert g.name == "g" and g.scale == "smoke"
    # run order follows the file (seed innermost); ids name the axes sorted, the seed last
    assert [c.id for c in g.cells[:3]] == [
        "gate=lstm,topology=dual,seed=0", "gate=lstm,topology=dual,seed=1", "gate=fixed,topology=dual,seed=0",
    ]
    assert len(g.cells) == 8 and len({c.id for c in g.cells}) == 8
    assert g.cells[1].group == "gate=lstm,topology=dual"
    c = g.cells[2]
    assert (c.config.model.recurrent.gate, c.config.model.recurrent.topology, c.config.train.seed) == ("fixed", "dual", 0)
    assert c.config.log.experiment == "lrexp-g"
    assert c.config.log.run_name == "Slide:4L gate=fixed topology=dual seed=0"  # Slide's name says neither axis
    assert g.reference == g.cells[0].group  # no reference and no Slide:13L cell: the first cell


def test_ids_and_hashes_do_not_depend_on_key_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = expand(write(tmp_path / "a", "g", {
        "base": {"scale": "smoke", "model": {"dropout": 0.0}},
        "axes": {"model.window": [4, 8], "model.recurrent.num_states": [2, 4]},
    }))
    b = expand(write(tmp_path / "b", "g", {
        "axes": {"model.recurrent.num_states": [2, 4], "model.window": [4, 8]},
        "base": {"model.dropout": 0.0, "scale": "smoke"},
    }))
    ids = lambda g: {c.id: c.config_hash for c in g.cells}  # noqa: E731
    assert ids(a) == ids(b)
    assert "num_states=2,window=4" in ids(a)


def test_same_leaf_name_uses_full_keys(tmp_path):
    g = expand(write(tmp_path, "g", {"base": BASE, "axes": {"data.seed": [1], "model.dropout": [0.0, 0.1]}}))
    assert [c.id for c in g.cells] == ["dropout=0.0,seed=1", "dropout=0.1,seed=1"]
    g = expand(write(tmp_path, "g2", {"base": BASE, "axes": {"data.seed": [1]}, "seeds": [0]}))
    assert [c.id for c in g.cells] == ["data.seed=1,train.seed=0"]


def test_per_scale_values_follow_the_scale(tmp_path):
    path = write(tmp_path, "g", {
        "base": {"scale": "smoke"},
        "axes": {"model.recurrent.num_states": {"smoke": [2, 4], "tiny": [8, 16, 32]}},
        "reference": {"num_states": {"smoke": 4, "tiny": 16}},
    })
    g = expand(path)
    assert [c.id for c in g.cells] == ["num_states=2", "num_states=4"] and g.reference == "num_states=4"
    g = expand(path, ["scale=tiny"])
    assert g.scale == "tiny" and [c.config.model.recurrent.num_states for c in g.cells] == [8, 16, 32]
    assert g.reference == "num_states=16"
    with pytest.raises(GridError, match="no value for scale 'paper'"):
        expand(path, ["scale=paper"])
    assert len(expand(path, ["scale=paper", "model.recurrent.num_states=[128,256]"]).cells) == 2


def test_command_line_overrides(tmp_path):
    path = write(tmp_path, "g", {"base": BASE, "axes": {"model.window": [4, 8]}, "seeds": [0]})
    g = expand(path, ["model.dropout=0.2", "train.max_steps=3"])
    assert all(c.config.model.dropout == 0.2 and c.config.train.max_steps == 3 for c in g.cells)
    assert [c.id for c in g.cells] == ["window=4,seed=0", "window=8,seed=0"]
    g = expand(path, ["model.window=16"])  # an axis key pins the axis
    assert [c.id for c in g.cells] == ["window=16,seed=0"]
    g = expand(path, ["train.seed=[3,4]", "model.num_layers=[4,5]"])  # a list value makes an axis
    assert [c.id for c in g.cells][:2] == ["num_layers=4,window=4,seed=3", "num_layers=4,window=4,seed=4"]
    assert len(g.cells) == 8
    g = expand(path, ["model.recurrent.layers=[-2]"])  # a list-typed key stays a plain override
    assert len(g.cells) == 2 and g.cells[0].config.derived.recurrent_layers == [2]


def test_reference_selects_a_group(tmp_path):
    path = write(tmp_path, "g", {
        "base": BASE, "axes": {"model.window": [4, 8]}, "seeds": [0, 1], "reference": {"model.window": 8},
    })
    assert expand(path).reference == "window=8"
    # an overridden axis that drops the reference value falls back to the default
    assert expand(path, ["model.window=[4,16]"]).reference == "window=4"
    bad = write(tmp_path, "b", {"base": BASE, "axes": {"model.window": [4]}, "reference": {"gate": "lstm"}})
    with pytest.raises(GridError, match="reference names 'gate'"):
        expand(bad)


def test_cell_file_reloads_to_the_same_config(tmp_path):
    g = expand(write(tmp_path, "g", {
        "base": {**BASE, "model.segment_len": "${mul:8,${scale.window}}"}, "axes": {"model.window": [4, 16]},
    }))
    cell = g.cells[1]
    cfg = cell_config(cell, g, parent_id="p123")
    path = write_cell(cfg, tmp_path / "runs" / cell.dirname, g, cell)
    loaded = load([path])
    assert config_hash(loaded) == cell.config_hash
    assert loaded.derived.segment_len == 64 and loaded.model.window == 16
    assert loaded.log.tags == {
        "mlflow.parentRunId": "p123", "lrexp.grid": "g", "lrexp.cell": "window=16", "lrexp.group": "window=16",
        "lrexp.cell_index": "1", "lrexp.config_hash": cell.config_hash, "lrexp.continue_hash": cell.continue_hash,
    }
    assert loaded.log.run_name == "Slide:4L window=16" and loaded.log.experiment == "lrexp-g"
    assert cell.config.log.tags == {}  # the expanded cell is not changed by adding the tags


def test_cell_file_keeps_tags_that_read_as_numbers(tmp_path):
    """A hash is hex: '9e94038183485901' is a float to OmegaConf's YAML loader (inf) and '0123' an int; the cell
    file keeps them strings, else --resume finds no run of the cell to skip or continue."""
    g = expand(write(tmp_path, "g", {"base": BASE, "axes": {"model.window": [4]}}))
    cell = g.cells[0]
    cfg = cell_config(cell, g, parent_id="p123")
    tags = {"lrexp.continue_hash": "9e94038183485901", "lrexp.config_hash": "0123456789012345", "x": "yes"}
    cfg.log.tags.update(tags)
    loaded = load([write_cell(cfg, tmp_path / "runs" / cell.dirname, g, cell)])
    assert {k: loaded.log.tags[k] for k in tags} == tags


def test_hash_ignores_only_per_invocation_fields(tmp_path):
    cfg = load(overrides=["scale=smoke"])
    h = config_hash(cfg)
    cfg.log.tags = {"mlflow.parentRunId": "x"}
    cfg.log.run_name = "y"
    assert config_hash(cfg) == h
    steps = config_hash(cfg, steps=False)
    cfg.train.max_steps += 1
    assert config_hash(cfg) != h
    assert config_hash(cfg, steps=False) == steps  # the run to train on is found by this one
    cfg.model.dropout = 0.2
    assert config_hash(cfg, steps=False) != steps


def test_dirname_is_safe():
    cell = Cell(0, "corpus=/tmp/a b/c,window=4", "g", {}, [], None, "h", "c")  # type: ignore[arg-type]
    assert cell.dirname == "corpus-_tmp_a_b_c,window-4"
    long = Cell(0, "x=" + "a" * 300, "g", {}, [], None, "h", "c")  # type: ignore[arg-type]
    assert len(long.dirname) <= 120


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({"base": BASE, "axes": {"model.windw": [4]}}, [], "unknown config key 'model.windw'; did you mean 'model.window'"),
        ({"base": BASE, "axes": {"model.window": []}}, [], "axis 'model.window' is empty"),
        ({"base": BASE, "axes": {"model.window": [4, 4]}}, [], "two cells have the id 'window=4'"),
        ({"base": BASE, "axes": {"model.window": [4, "4"]}}, [], "two cells have the id 'window=4'"),
        ({"base": BASE, "axes": {"model.window": 4}}, [], "must be a list of values"),
        ({"base": BASE, "axes": {"model.recurrent": [4]}}, [], "'model.recurrent' is a config section"),
        ({"base": BASE, "axes": {"derived.lanes": [4]}}, [], "computed by lrexp"),
        ({"base": {**BASE, "model.dropot": 0.1}, "axes": {"model.window": [4]}}, [], "base: unknown config key 'model.dropot'"),
        ({"base": BASE, "axis": {"model.window": [4]}}, [], "unknown grid key 'axis'"),
        ({"base": BASE}, [], "no axes and no seeds"),
        ({"base": BASE, "axes": {"model.window": [4]}, "seeds": []}, [], "seeds is empty"),
        ({"base": {**BASE, "train.seed": 1}, "seeds": [0]}, [], "with 'seeds:'"),
        ({"base": BASE, "axes": {"model.window": [4]}}, ["model.windw=3"], "did you mean 'model.window'"),
        ({"base": BASE, "axes": {"model.window": [4]}}, ["window"], "not of the form key=value"),
        ({"base": BASE, "axes": {"model.window": [4, 6]}}, [], "grid bad, cell window=6: 'data.tokens_per_step' (128)"),
    ],
)
def test_bad_grids_fail_with_one_line(tmp_path, data, overrides, message):
    with pytest.raises(GridError) as err:
        expand(write(tmp_path, "bad", data), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_grid_lists_the_available_ones():
    with pytest.raises(GridError) as err:
        expand("no_such_grid")
    assert "unknown grid 'no_such_grid'; available: " in str(err.value)
    for name in ("gates", "table", "window", "states"):
        assert name in str(err.value)


def test_gates_cells_are_the_six_rec_rows():
    """gates varies gate x topology on rec_fixed_skip: each cell must be exactly the row preset it names."""
    g = expand("gates")
    assert len(g.cells) == 6 and g.reference == "gate=fixed,topology=skip"
    for cell in g.cells:
        row = f"rec_{cell.values['model.recurrent.gate']}_{cell.values['model.recurrent.topology']}"
        preset = load(overrides=[f"row={row}", "log.progress_bar=false"])
        preset.log.experiment, preset.log.run_name = cell.config.log.experiment, cell.id
        assert config_hash(preset) == cell.config_hash, row
        assert cell.config.log.run_name == row_name(preset)  # Rec:lstm:dual says gate and topology: nothing more


def test_options_may_follow_the_grid_name():
    from lrexp.cli import build_parser
    from lrexp.commands.grid import _late_options
    from lrexp.errors import UserError

    args = _late_options(build_parser().parse_args(["grid", "gates", "--dry-run", "scale=small", "--out", "o"]))
    assert (args.name, args.dry_run, args.resume, str(args.out), args.overrides) == ("gates", True, False, "o", ["scale=small"])
    args = _late_options(build_parser().parse_args(["grid", "--resume", "gates", "train.seed=[0,1]"]))
    assert args.resume and args.overrides == ["train.seed=[0,1]"]
    with pytest.raises(UserError, match="unknown option '--bogus'"):
        _late_options(build_parser().parse_args(["grid", "gates", "--bogus"]))
