"""`make bench`'s report: every section present, with the fields a reader and a script need (not its numbers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick bench as `make bench` runs it: a process of its own, so what earlier tests compiled in this
    worker (dynamo's caches and recompile counts) cannot change its compile section."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--quick", "--out", str(out),
                           f"data.cache_dir={out / 'cache'}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return (out / "bench.md").read_text(), json.loads((out / "bench.json").read_text())


@pytest.mark.slow  # the quick bench trains and times two rows, compiles, prepares data: about 10 s
def test_quick_bench_writes_every_section(quick):
    md, data = quick
    for n, title in enumerate(["Step time of every row", "Scaling with the segment length", "Model FLOP utilisation",
                               "Framework overhead", "Data", "GPU", "torch.compile", "kNN memory per lane",
                               "Profile of one step", "lrexp eval: decode speed per cache policy"],
                              start=1):
        assert f"## {n}. {title}" in md
    smoke = data["eval"]["smoke"]  # --quick times h2o by the reference token path and by the token step
    assert smoke["native"] > 0 and smoke["h2o:token"]["block"] == 1 and smoke["h2o:step"]["vs_token"] > 0
    assert "python bench/bench.py --quick" in md and data["command"].startswith("python bench/bench.py --quick")
    assert {"torch", "python", "lightning", "cpu", "usable_cpus"} <= set(data["machine"])
    rows = data["rows"]["rows"]
    assert set(rows) == {"slide13", "rec_fixed_skip"}
    assert rows["slide13"]["vs_base"] == {"median": 1.0, "min": 1.0, "max": 1.0}  # ratios within a repeat
    for row in rows.values():
        assert row["step_s"]["min"] <= row["step_s"]["median"] <= row["step_s"]["max"]
        assert row["train_flops"] > 0 and row["mfu"]["median"] > 0
    assert rows["rec_fixed_skip"]["paper"] == 0.99
    for row in rows.values():  # compiled with dynamo's eager backend in --quick: one graph, no break
        assert row["compiled"]["backend"] == "eager" and row["compiled"]["graphs"] >= 1
        assert row["compiled"]["graph_breaks"] == 0 and row["compiled"]["step_s"]["median"] > 0
    assert data["rows"]["matmul"]["flop_per_s"]["median"] > 0
    for stack in ("Full", "XL", "Slide", "Rec"):
        assert set(data["scaling"][stack]["points"]) == {"64", "128"}
        assert data["scaling"][stack]["time_exponent"] is not None
    overhead = data["overhead"]
    assert overhead["steps_timed"] == 3 and overhead["lrexp_train_tokens_per_s"] > 0 and "overhead" in overhead
    assert set(data["data"]["prepare"]) >= {"1"} and 0 < data["data"]["loader_share"] < 1
    if data["machine"]["device"] == "cpu":
        assert data["gpu"] == {"skipped": "no CUDA device"} and "Skipped: no CUDA device" in md
    assert set(data["profile"]) == {"slide13", "rec_fixed_skip"}
    assert data["profile"]["rec_fixed_skip"]["op_calls"] > data["profile"]["slide13"]["op_calls"]  # the block loop
