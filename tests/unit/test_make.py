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


def test_make_test_slow_passes_when_no_test_is_collected():
    """pytest's exit status 5 (nothing collected) is no failure of the slow tier, so CI's .ci/run goes on."""
    out = subprocess.run(["make", "test-slow", "TEST_WORKERS=0", "PYTEST_ARGS=tests/unit/test_make.py -k no_such_test"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "deselected" in out.stdout


def test_make_test_and_make_test_slow_split_the_suite():
    tiers = [subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
             for target in ("test", "test-slow")]
    assert '-m "not slow and not gpu"' in tiers[0] and '-m "slow or gpu"' in tiers[1]
