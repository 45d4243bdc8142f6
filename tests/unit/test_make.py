"""The Makefile's user-facing knobs (`make -n` prints the commands without running them)."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("args,port", [((), "5000"), (("PORT=5123",), "5123")])
def test_make_ui_serves_on_the_given_port(args, port):
    out = subprocess.run(["make", "-n", "ui", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"--port {port}" in out


def test_make_bench_runs_the_one_benchmark_with_its_options():
    out = subprocess.run(["make", "-n", "bench", "SCALE=smoke", "BENCH_ARGS=--quick"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "bench/bench.py scale=smoke --quick" in out
