"""`make gpu-check` (scripts/gpu_check.py) is known to start: it refuses without CUDA in one line, and with --dry
runs every part at tiny size on the CPU (docs/benchmark.md#gpu-check)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.mark.slow  # imports Lightning, the bench harness and the training stack: over 10 s on 2 loaded cores
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_refuses_in_one_line(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "needs a CUDA device" in out and "DRY=1" in out


@pytest.mark.slow  # every part at tiny size, the interpreter and three short trainings: minutes on 2 cores
def test_the_dry_run_runs_every_part_on_the_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry"] and results["tests"]["ok"] and results["kernels"]["ok"]
    assert any("triton" in line for line in results["kernels"]["lines"])
    measured = [row for row in results["rows"]["rows"].values() if "step_s" in row]
    assert measured and all(row["tokens_per_s"] > 0 and row["backend"] == "sdpa" for row in measured)
    assert results["train"]["losses"] and results["eval"]["tokens_per_s"]
    assert (tmp_path / "README.md").read_text().startswith("# GPU check")
