"""The console script: user errors are one stderr line, exit non-zero, no traceback."""

import subprocess
import sys

from lrexp.config.paths import EXPERIMENTS


def _lrexp(*args):
    return subprocess.run(
        [sys.executable, "-m", "lrexp.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_show_config_prints_resolved_yaml():
    out = _lrexp("show-config", "scale=smoke", "model.window=4")
    assert out.returncode == 0, out.stderr
    assert "window: 4" in out.stdout and "segment_len: 32" in out.stdout


def test_show_config_typo_is_one_line():
    out = _lrexp("show-config", str(EXPERIMENTS / "scales" / "paper.yaml"), "model.gatee=lstm")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "model.gatee" in lines[0] and "model.recurrent.gate" in lines[0]
    assert "Traceback" not in out.stderr


def test_a_config_file_whose_path_holds_an_equals_sign_is_a_file(tmp_path):
    from lrexp.commands.show_config import split_items

    odd = tmp_path / "lr=3e-4.yaml"
    odd.write_text("optim:\n  lr: 0.0003\n")
    files, overrides = split_items([str(odd), "train.max_steps=5", "base.yaml"])
    assert files == [str(odd), "base.yaml"]
    assert overrides == ["train.max_steps=5"]
