"""The console script: user errors are one stderr line, exit non-zero, no traceback."""

import argparse
import subprocess
import sys

import pytest

from lrexp.cli import build_parser
from lrexp.commands.options import late_options
from lrexp.config import EXPERIMENTS


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


@pytest.mark.parametrize("argv, given", [
    (["grid", "gates", "--dry-run", "scale=small", "--jobs", "0"], {"dry_run": True, "jobs": 0}),
    (["grid", "--resume", "gates", "scale=small", "--list"], {"resume": True, "list": True}),
    (["eval", "ckpt", "scale=small", "--budget", "8", "--context", "0"], {"budget": ["8"], "context": 0}),
])
def test_options_after_an_override_are_read_as_given(argv, given):
    """Every sub-command reads an option after a key=value override as written: 0 is a value, and a flag
    written before the override stays set (the eval command's own copy of the parser once reset it)."""
    args = late_options(build_parser().parse_args(argv))
    assert {k: getattr(args, k) for k in given} == given
    assert args.overrides == ["scale=small"]


def test_every_sub_command_with_overrides_shares_the_late_option_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    takes_overrides = [name for name, p in sub.choices.items()
                       if any(a.dest == "overrides" and a.nargs == argparse.REMAINDER for a in p._actions)]
    assert takes_overrides == ["grid", "eval"]
    for name in takes_overrides:
        assert sub.choices[name].get_default("_add_options") is not None, name
