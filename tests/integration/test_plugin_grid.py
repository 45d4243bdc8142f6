"""A grid cell trains a variant that a plugin outside the project registers (docs/plugins.md): the grid
process checks the cell with it, and the cell's own `lrexp train` process imports it from its config file."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import yaml
from mlflow.tracking import MlflowClient

from corpora import word_documents
from lrexp import cli
from lrexp.config import plugins
from lrexp.model.variants import VARIANTS

PLUGIN = textwrap.dedent('''
    from lrexp.layers import LayerSpec
    from lrexp.model.variants import register_variant


    def every_other_dense(cfg):
        return [LayerSpec("attention", window=None if i % 2 else cfg.model.window) for i in range(cfg.model.num_layers)]


    register_variant("mixed_grid", every_other_dense, lambda cfg: f"Mixed:{cfg.model.num_layers}L")
''')


@pytest.mark.slow  # a grid cell is a real `lrexp train` process: tens of seconds on 2 CPU cores
def test_a_grid_cell_trains_a_plugin_variant(tmp_path, monkeypatch):
    folder = tmp_path / "outside" / "my_lrexp"  # a folder of the user's, not in the project
    folder.mkdir(parents=True)
    (folder / "mixed_rows.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(plugins, "_loaded", set())
    corpus = word_documents(tmp_path / "corpus", "plugins add rows without editing the package",
                            [60 + 9 * i for i in range(12)])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    grid = tmp_path / "plugin_grid.yaml"
    grid.write_text(yaml.safe_dump({
        "base": {
            "scale": "smoke", "plugins": ["mixed_rows"],
            "data": {"corpus": str(corpus), "tokenizer": "bytes", "cache_dir": str(tmp_path / "data"),
                     "val_fraction": 0.25, "test_fraction": 0.25},
            "train": {"max_steps": 2, "val_every": 2, "val_tokens": 128, "accelerator": "cpu",
                      "checkpoint_dir": str(tmp_path / "ckpt")},
            "log": {"tracking_uri": uri},
        },
        "axes": {"model.variant": ["mixed_grid"]},
    }))
    try:
        assert cli.main(["grid", str(grid), "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    finally:
        VARIANTS.pop("mixed_grid", None)
        sys.modules.pop("mixed_rows", None)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lrexp-plugin_grid")
    (cell,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("lrexp.role") != "parent"]
    assert cell.info.status == "FINISHED" and cell.data.tags["lrexp.row"] == "Mixed:4L"
    assert cell.data.params["plugins"] == "['mixed_rows']"
