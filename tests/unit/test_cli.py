"""The console script: user errors are one stderr line, exit non-zero, no traceback."""

import importlib
import subprocess
import sys

import pytest

from lrexp.cli import COMMANDS, build_parser
from lrexp.commands.options import late_options
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


def test_train_resume_of_an_unknown_run_is_one_line():
    """`lrexp train` reaches the training module (it once asked the package `lrexp.train` for it)."""
    out = _lrexp("train", "scale=smoke", "--resume", "no_such_run")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "no_such_run" in out.stderr


def test_a_config_file_whose_path_holds_an_equals_sign_is_a_file(tmp_path):
    from lrexp.commands.show_config import split_items

    odd = tmp_path / "lr=3e-4.yaml"
    odd.write_text("optim:\n  lr: 0.0003\n")
    files, overrides = split_items([str(odd), "train.max_steps=5", "base.yaml"])
    assert files == [str(odd), "base.yaml"]
    assert overrides == ["train.max_steps=5"]


@pytest.mark.parametrize("argv, given", [
    (["grid", "gates", "--dry-run", "scale=small", "--jobs", "0"], {"dry_run": True, "jobs": 0}),
    (["grid", "gates", "scale=small", "--jobs", "auto"], {"jobs": "auto"}),
    (["grid", "--resume", "gates", "scale=small", "--list"], {"resume": True, "list": True}),
    (["eval", "ckpt", "scale=small", "--budget", "8", "--context", "0"], {"budget": ["8"], "context": 0}),
])
def test_options_after_an_override_are_read_as_given(argv, given):
    """Every sub-command that takes overrides reads an option after a key=value override as written: 0 is a
    value, and a flag written before the override stays set (the eval command's own copy of the parser once
    reset it)."""
    module = importlib.import_module(COMMANDS[argv[0]][0])
    args = late_options(build_parser().parse_args(argv), module._add_options, argv[0])
    assert {k: getattr(args, k) for k in given} == given
    assert args.overrides == ["scale=small"]
