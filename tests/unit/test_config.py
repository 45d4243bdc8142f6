"""Config loading and validation: every YAML validates, every user error is one clear line."""

from pathlib import Path

import pytest

from lrexp.config.errors import ConfigError
from lrexp.config.load import check_key, compose, flatten, load, to_dict
from lrexp.config.paths import EXPERIMENTS, PROJECT_ROOT, project_path


def test_defaults_resolve_to_tiny_scale():
    cfg = load()
    assert cfg.scale.name == "tiny"
    assert cfg.model.d_model == cfg.scale.d_model
    assert cfg.derived.segment_len == cfg.model.blocks_per_segment * cfg.model.window
    assert cfg.derived.lanes * cfg.derived.segment_len == cfg.data.tokens_per_step
    assert cfg.derived.head_dim * cfg.model.num_heads == cfg.model.d_model


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "scales").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_scale_validates(path):
    cfg = load([path])
    assert cfg.scale.name == path.stem


def test_paper_scale_sizes():
    cfg = load(overrides=["scale=paper", "model.recurrent.layers=[-3]"])
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.d_ff, m.window) == (12, 1024, 8, 1024 * 4, 512)
    assert cfg.derived.segment_len == 4096 and cfg.derived.lanes == 32  # 32 devices x 1 lane in the paper
    assert cfg.data.tokens_per_step == 131072
    assert cfg.derived.recurrent_layers == [9]  # layer 10 of 12, 1-based


@pytest.mark.parametrize("scale", ["tiny", "small", "paper"])
def test_every_scale_keeps_the_papers_lanes_at_equal_tokens(scale):
    """32 lanes for the N = 8W rows, 256 for XL:W, 128 for XL:2W, 64 for XL:4W; tokens per step equal."""
    lanes = {row: load(overrides=[f"scale={scale}", f"row={row}"]).derived.lanes
             for row in ("slide13", "rec_fixed_skip", "fb_fixed_skip", "full", "xl512", "mem64k", "xl1024", "xl2048")}
    assert lanes == {"slide13": 32, "rec_fixed_skip": 32, "fb_fixed_skip": 32, "full": 32, "xl512": 256,
                     "mem64k": 256, "xl1024": 128, "xl2048": 64}
    grouped = load(overrides=[f"scale={scale}", "row=xl512", "train.devices=4", "train.lane_groups=8"])
    assert (grouped.derived.lanes_per_rank, grouped.derived.lanes_per_group) == (64, 8)


def test_override_and_file_order(tmp_path: Path):
    f = tmp_path / "a.yaml"
    f.write_text("model:\n  window: 16\n")
    cfg = load([f], ["model.dropout=0.1"])
    assert cfg.model.window == 16 and cfg.model.dropout == 0.1
    assert cfg.derived.segment_len == 16 * 8  # derived from the new window
    cfg2 = load([f], ["model.window=8"])
    assert cfg2.model.window == 8  # overrides come after files


def test_resolve_is_idempotent():
    cfg = load(overrides=["model.recurrent.layers=[-3]"])
    resolved = {k: v for k, v in to_dict(cfg).items() if k != "derived"}  # what a checkpoint or cell keeps
    again = load([("resolved", resolved)])
    assert to_dict(again) == to_dict(cfg)


def test_flatten_has_dotted_keys():
    flat = flatten(load())
    assert flat["model.recurrent.gate"] == "fixed"
    assert flat["derived.segment_len"] > 0


def _error(*overrides, files=()):
    with pytest.raises(ConfigError) as info:
        load(files, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_names_it_and_suggests():
    msg = _error("model.gatee=lstm", files=[EXPERIMENTS / "scales" / "paper.yaml"])
    assert "model.gatee" in msg and "model.recurrent.gate" in msg
    assert "model.d_model" in _error("model.d_modle=3")


def test_unknown_key_in_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  windw: 16\n")
    msg = _error(files=[f])
    assert "model.windw" in msg and "model.window" in msg and str(f) in msg


def test_bad_enum_lists_allowed_values():
    msg = _error("model.recurrent.gate=gru")
    assert "gru" in msg and "lstm" in msg and "fixed" in msg


def test_bad_type():
    assert "model.d_model" in _error("model.d_model=abc")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.num_heads=3", "must divide"),
        ("model.segment_len=100", "multiple of 'model.window'"),
        ("model.recurrent.layers=[7]", "outside a stack of 4"),
        ("model.recurrent.layers=[-5]", "outside a stack of 4"),
        ("model.recurrent.layers=[1,-3]", "twice"),
        ("model.window=0", "'model.window' must be > 0"),
        ("model.recurrent.num_states=-1", "must be > 0"),
        ("data.tokens_per_step=100", "multiple of the segment length"),
        ("train.devices=3", "do not divide over 3 rank(s) x 1 lane group(s)"),
        ("train.num_nodes=3", "do not divide over 3 rank(s) x 1 lane group(s)"),
        ("model.dropout=1.5", "[0, 1)"),
    ],
)
def test_inconsistent_sizes(override, needle):
    assert needle in _error(override)


def test_derived_cannot_be_set():
    assert "computed" in _error("derived.lanes=3")


def test_bad_override_syntax_and_presets():
    with pytest.raises(ConfigError, match="empty key"):
        compose((), ["=3"])
    with pytest.raises(ConfigError, match="key=value"):
        compose((), ["model.window"])
    assert "unknown scale 'huge'" in _error("scale=huge")
    assert "unknown row" in _error("row=nope")


def test_missing_and_invalid_files(tmp_path: Path):
    assert "not found" in _error(files=[tmp_path / "none.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    assert "not valid YAML" in _error(files=[bad])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert "mapping" in _error(files=[lst])


def test_flatten_walks_schema_sections_only():
    """Nested and dotted keys give the same dotted keys; open sections and unknown keys stay one value."""
    nested = {"model": {"recurrent": {"gate": "lstm"}, "attn.backend": "sdpa"}, "log": {"tags": {"a.b": "c"}}}
    dotted = {"model.recurrent": {"gate": "lstm"}, "model.attn.backend": "sdpa", "log.tags": {"a.b": "c"}}
    expected = {"model.recurrent.gate": "lstm", "model.attn.backend": "sdpa", "log.tags": {"a.b": "c"}}
    assert flatten(nested) == flatten(dotted) == expected
    assert flatten({"model": {"gone": {"x": 1}}}) == {"model.gone": {"x": 1}}  # not a section: not walked
    cfg = load(overrides=["log.tags.grid=g"])
    flat = flatten(cfg)
    assert flat == flatten(to_dict(cfg))  # a RunConfig is flattened resolved
    assert flat["log.tags"] == {"grid": "g"} and flat["derived.lanes"] == cfg.derived.lanes


class _GridError(ConfigError):
    pass


@pytest.mark.parametrize("key, grid, needle", [
    ("derived.lanes", False, "'derived.lanes' is computed by lrexp"),
    ("derived", True, "'derived' is computed by lrexp"),
    ("model.gatee", False, "unknown config key 'model.gatee'; did you mean 'model.recurrent.gate'?"),
    ("row", False, "unknown config key 'row'"),
    ("model.attn", True, "'model.attn' is a config section; name one of its keys ('model.attn.<name>')"),
])
def test_check_key_refuses_naming_where(key, grid, needle):
    options = {"selectors": True, "sections": False, "error": _GridError} if grid else {}
    with pytest.raises(_GridError if grid else ConfigError) as info:
        check_key(key, "grid g, axes", **options)
    assert str(info.value).startswith(f"grid g, axes: {needle}")


@pytest.mark.parametrize("key", ["model.window", "log.tags", "log.tags.lrexp.cell", "model.attn"])
def test_check_key_accepts_values_open_entries_and_sections(key):
    check_key(key, "override")


@pytest.mark.parametrize("key", ["scale", "row", "model.window", "log.tags.anything"])
def test_check_key_as_a_grid_accepts_selectors(key):
    check_key(key, "grid", selectors=True, sections=False)


def test_project_path_is_under_the_repository_root(tmp_path: Path):
    assert (PROJECT_ROOT / "experiments" / "base.yaml").is_file() and EXPERIMENTS == PROJECT_ROOT / "experiments"
    assert project_path("checkpoints") == PROJECT_ROOT / "checkpoints"
    assert project_path(tmp_path) == tmp_path
