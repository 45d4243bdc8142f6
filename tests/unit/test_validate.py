"""`check_run`: a config `show-config`, `grid --dry-run` and `train` call valid is one whose run starts.

Two configs the schema alone passed and the run then failed on: a layer whose window the segment length
is not a multiple of (only the built model knows its layers' windows), and a probe corpus with the BPE
tokenizer (only the data side knows). Each fails in all three commands, in one line, before any work.
"""

import pytest
import yaml

from lrexp import cli
from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.layers import LayerSpec
from lrexp.train.validate import check_run
from lrexp.model.variants import VARIANTS, Variant


@pytest.fixture
def wide(monkeypatch):
    """A variant whose layers attend over twice model.window: N = W passes the config, not the layers."""
    stack = lambda cfg: [LayerSpec("attention", window=2 * cfg.model.window) for _ in range(cfg.model.num_layers)]
    monkeypatch.setitem(VARIANTS, "wide", Variant(stack, lambda cfg: "Wide"))
    return ["scale=smoke", "model.variant=wide", "model.blocks_per_segment=1"]


PASSKEY_BPE = ["scale=smoke", "data.corpus=passkey"]  # the default tokenizer is the BPE


def _one_line_error(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_a_segment_no_layer_window_divides_fails_before_the_run(wide, capsys):
    cfg = load(overrides=wide)  # the schema's rule (N a multiple of model.window) holds
    with pytest.raises(ConfigError, match=r"segment length \(8\) must be a multiple .* 'wide' needs a multiple of 16"):
        check_run(cfg)
    _one_line_error(capsys, ["show-config", *wide], "model.segment_len")


def test_a_probe_with_the_bpe_tokenizer_fails_before_the_run(capsys):
    with pytest.raises(ConfigError, match="set data.tokenizer=bytes"):
        check_run(load(overrides=PASSKEY_BPE))
    _one_line_error(capsys, ["show-config", *PASSKEY_BPE], "set data.tokenizer=bytes")
    check_run(load(overrides=[*PASSKEY_BPE, "data.tokenizer=bytes"]))


@pytest.mark.parametrize("axis,bad", [("model.variant", "wide"), ("data.corpus", "passkey")])
def test_grid_dry_run_checks_every_cell(wide, tmp_path, capsys, axis, bad):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"base": {"scale": "smoke", "model.blocks_per_segment": 1},
                                    "axes": {axis: ["slide", bad] if axis == "model.variant" else ["stdlib", bad]}}))
    _one_line_error(capsys, ["grid", str(path), "--dry-run"], f"cell {axis.rsplit('.', 1)[-1]}={bad}:")


@pytest.mark.parametrize("bad", ["wide", "passkey"])
def test_train_fails_before_its_mlflow_run(wide, tmp_path, bad):
    from lrexp.train import run as train

    store = tmp_path / "mlflow.db"
    overrides = wide if bad == "wide" else PASSKEY_BPE
    cfg = load(overrides=[*overrides, f"log.tracking_uri=sqlite:///{store}"])
    with pytest.raises(ConfigError):
        train.run(cfg)
    assert not store.exists()  # nothing was opened, logged or prepared


def test_every_row_at_every_scale_passes():
    from lrexp.config.paths import EXPERIMENTS

    for scale in sorted(p.stem for p in (EXPERIMENTS / "scales").glob("*.yaml")):
        for row in sorted(p.stem for p in (EXPERIMENTS / "rows").glob("*.yaml")):
            check_run(load(overrides=[f"scale={scale}", f"row={row}"]))
