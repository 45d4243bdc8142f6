"""The report reads MLflow alone: runs are created here directly with MlflowClient in a tmp sqlite store."""

from __future__ import annotations

import csv
import time

import pytest
from mlflow.tracking import MlflowClient

from lrexp import cli
from lrexp.config.load import load
from lrexp.report import collect, plots, tables
from lrexp.report.collect import ReportError
from lrexp.lit.run_logger import run_tags


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root}/mlflow.db"  # creating a store runs migrations: once per module
    client = MlflowClient(uri)
    return {"root": root, "uri": uri, "client": client}


def parent(client, exp_id, grid, reference="", invoked=None):
    tags = {"lrexp.role": "parent", "lrexp.grid": grid, "lrexp.reference": reference}
    if invoked is not None:
        tags["lrexp.invoked_at"] = str(invoked)
    return client.create_run(exp_id, run_name=f"grid:{grid}", tags=tags).info.run_id


def child(client, exp_id, parent_id, cell, group, index, status="FINISHED", metrics=None, row="Rec:fixed:skip",
          error=None, curve=(), preset=None):
    tags = {"mlflow.parentRunId": parent_id, "lrexp.cell": cell, "lrexp.group": group, "lrexp.cell_index": str(index),
            "lrexp.row": row}
    if preset:
        tags["lrexp.row_preset"] = preset
    if error:
        tags["lrexp.error"] = error
    run_id = client.create_run(exp_id, run_name=cell, tags=tags).info.run_id
    client.log_param(run_id, "derived.segment_len", "64")
    client.log_param(run_id, "model.window", group.split("=")[1])
    if ",seed=" in cell:
        client.log_param(run_id, "train.seed", cell.rsplit("=", 1)[1])
    for step, value in curve:
        client.log_metric(run_id, "val/bits_per_token", value, step=step)
    for k, v in (metrics or {}).items():
        client.log_metric(run_id, k, v, step=4)
    client.set_terminated(run_id, status)
    time.sleep(0.002)  # distinct start times: "the latest run of a cell" must be well defined
    return run_id


def main_table(markdown):
    """The comparison table's lines (header and separator left out): up to the first blank line after it."""
    lines = markdown.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start + 2:end]


def finals(step_time, bpt, bpb=None, pos=None):
    out = {"final/step_time_s": step_time, "final/val_bits_per_token": bpt, "final/params": 123456,
           "final/tokens_seen": 512}
    if bpb is not None:
        out["final/val_bits_per_byte"] = bpb
    for bucket, value in (pos or {}).items():
        out[f"final/val_bits_per_token_by_pos_{bucket}"] = value
    return out


def test_table_seeds_failures_and_files(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-rep", artifact_location=str(store["root"] / "art"))
    pid = parent(client, exp, "rep", reference="window=8")
    client.set_tag(pid, "lrexp.cells", "6")  # one cell never ran
    pos = {"0-64": 4.0, "64-256": 3.5, "1024": 3.0, "256-1024": 3.2}
    child(client, exp, pid, "window=4,seed=0", "window=4", 0, metrics=finals(0.2, 3.0, 1.0, pos), curve=[(2, 5.0), (4, 3.0)])
    child(client, exp, pid, "window=4,seed=1", "window=4", 1, metrics=finals(0.4, 3.2, 1.2, pos), curve=[(2, 5.1), (4, 3.2)])
    child(client, exp, pid, "window=8,seed=0", "window=8", 2, metrics=finals(0.3, 2.9), curve=[(4, 2.9)])
    child(client, exp, pid, "window=8,seed=1", "window=8", 3, status="FAILED", error="RuntimeError: first try")
    child(client, exp, pid, "window=8,seed=1", "window=8", 3, metrics=finals(0.3, 3.1), curve=[(4, 3.1)])
    child(client, exp, pid, "window=16,seed=0", "window=16", 4, status="FAILED", error="ConfigError: bad value")

    rep = collect.build("rep", tmp_path / "out", uri=store["uri"])

    assert [r.group for r in rep.rows] == ["window=4", "window=8", "window=16"]
    w4, w8, w16 = rep.rows
    assert rep.reference == "window=8" and w8.step_time_rel.mean == pytest.approx(1.0)
    assert w4.step_time_rel.mean == pytest.approx(1.0) and w4.step_time_rel.std == pytest.approx(0.1414214 / 0.3)
    assert w4.bits_per_token.mean == pytest.approx(3.1) and w4.bits_per_token.std == pytest.approx(0.1414214)
    assert w4.bits_per_byte.text(2) == "1.10 ± 0.14"
    assert w8.bits_per_token.mean == pytest.approx(3.0) and w8.status == "FINISHED"  # the retry counts
    assert w8.bits_per_byte.text(4) == "–"
    assert w16.status == "FAILED (1 of 1)" and w16.bits_per_token.mean is None

    table = main_table(rep.markdown)
    assert len(table) == 3
    assert table[0].split(" | ")[4:14] == ["≈ 1.00 ± 0.47", "3.1000 ± 0.1414", "+0.1000 [+0.1000, +0.1000]", "–",
                                           "–", "1.1000 ± 0.1414", "–", "123k", "512", "2/2"]
    assert table[1].split(" | ")[6] == "reference" and table[1].split(" | ")[4] == "1.00 ± 0.00"  # no ≈ on itself
    assert "relative to `window=8`" in rep.markdown and "4 of 5 cell runs finished, 6 cells in the grid" in rep.markdown
    assert "`window=16,seed=0` (FAILED" in rep.markdown and "ConfigError: bad value" in rep.markdown

    out = tmp_path / "out"
    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == ["window=4", "window=8", "window=16"]
    assert float(rows[0]["bits_per_token"]) == pytest.approx(3.1) and rows[2]["bits_per_token"] == ""
    for name in ("table.md", "table.csv", "val_bits_per_token.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 0
    logged = {a.path for a in client.list_artifacts(pid, "report")}
    assert logged == {f"report/{n}" for n in ("table.md", "table.csv", "val_bits_per_token.png", "loss_by_position.png")}


def test_reference_falls_back_to_slide13_then_first(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-ref", artifact_location=str(store["root"] / "art"))
    pid = parent(client, exp, "ref", reference="row=gone")
    child(client, exp, pid, "row=a", "row=a", 0, metrics=finals(0.5, 3.0), row="XL:512")
    child(client, exp, pid, "row=b", "row=b", 1, metrics=finals(0.25, 3.0), row="Slide:13L", preset="slide13")
    rep = collect.build("ref", tmp_path / "o1", uri=store["uri"])
    assert rep.reference == "row=b" and rep.rows[0].step_time_rel.mean == pytest.approx(2.0)
    rows, ref = collect.aggregate([c for c in rep.cells if c.row == "XL:512"], "row=gone")
    assert ref == "row=a" and rows[0].step_time_rel.mean == pytest.approx(1.0)


def test_latest_invocation_and_explicit_parent(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-two", artifact_location=str(store["root"] / "art"))
    old = parent(client, exp, "two", invoked=3_000_000_000_000)  # created first, resumed last
    new = parent(client, exp, "two", invoked=2_000_000_000_000)
    a_child = child(client, exp, old, "a=1", "a=1", 0, metrics=finals(1.0, 3.0))
    child(client, exp, new, "a=2", "a=2", 0, metrics=finals(1.0, 3.0))
    assert collect.build("two", tmp_path / "o2", uri=store["uri"]).rows[0].group == "a=1"
    assert collect.build("two", tmp_path / "o3", parent_id=new, uri=store["uri"]).rows[0].group == "a=2"
    with pytest.raises(ReportError, match="not a parent run"):
        collect.build("two", tmp_path / "o4", parent_id=a_child, uri=store["uri"])


def test_missing_grid_is_one_line(store, tmp_path):
    with pytest.raises(ReportError) as err:
        collect.build("never_ran", tmp_path, uri=store["uri"])
    assert "no MLflow experiment 'lrexp-never_ran'" in str(err.value) and "lrexp grid never_ran" in str(err.value)
    client = store["client"]
    client.create_experiment("lrexp-empty", artifact_location=str(store["root"] / "art"))
    with pytest.raises(ReportError, match="holds no grid parent run"):
        collect.build("empty", tmp_path, uri=store["uri"])


def test_counts_and_buckets_format():
    assert tables.count(123456) == "123k" and tables.count(2.5e6) == "2.5M" and tables.count(12) == "12"
    assert sorted(["1024", "64-256", "0-64"], key=plots._bucket_low) == ["0-64", "64-256", "1024"]
    assert [plots._bucket_text(b) for b in ("0-64", "1024")] == ["0-64", "1024+"]


def test_probe_cells_add_an_answer_column_to_table_and_csv(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-probe", artifact_location=str(store["root"] / "art"))
    pid = parent(client, exp, "probe")
    for seed, answer in enumerate((3.0, 3.4)):
        metrics = {**finals(0.2, 2.0, 0.8), "final/val_answer_bits_per_token": answer}
        child(client, exp, pid, f"window=4,seed={seed}", "window=4", seed, metrics=metrics)
    rep = collect.build("probe", tmp_path, uri=store["uri"])
    header, _, line = [ln for ln in rep.markdown.splitlines() if ln.startswith("|")][:3]
    assert header.split(" | ")[5:12] == ["bits/token", "Δ bits/token", "test bits/token", "Δ test bits/token",
                                         "bits/byte", "answer bits/token", "targets"]
    assert line.split(" | ")[10] == "3.2000 ± 0.2828"
    with open(tmp_path / "table.csv") as f:
        assert float(next(csv.DictReader(f))["answer_bits_per_token"]) == pytest.approx(3.2)


def test_cells_that_log_their_carried_state_bytes_add_a_column(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-statebytes", artifact_location=str(store["root"] / "art"))
    pid = parent(client, exp, "statebytes")
    for index, (cell, size) in enumerate((("dtype=float32", 32768), ("dtype=bfloat16", 16384))):
        child(client, exp, pid, cell, cell, index, metrics={**finals(0.2, 2.0), "final/state_bytes_per_lane": size})
    rep = collect.build("statebytes", tmp_path, uri=store["uri"])
    header = next(ln for ln in rep.markdown.splitlines() if ln.startswith("|"))
    lines = main_table(rep.markdown)
    at = header.split(" | ").index("state bytes/lane")
    assert header.split(" | ")[at - 1] == "params" and [ln.split(" | ")[at] for ln in lines] == ["32.8k", "16.4k"]
    with open(tmp_path / "table.csv") as f:
        assert [float(r["state_bytes_per_lane"]) for r in csv.DictReader(f)] == [32768, 16384]


def test_differences_to_the_reference_are_paired_by_seed_and_marked_when_unresolved(store, tmp_path):
    """Δ is the mean of per-seed differences: a shift shared by the seeds of both rows (data order, init)
    cancels, so a small consistent gap is resolved while a larger noisy one is not; one seed has no spread."""
    client = store["client"]
    exp = client.create_experiment("lrexp-pairs", artifact_location=str(store["root"] / "art"))
    pid = parent(client, exp, "pairs", reference="row=slide")
    seeds = {0: 5.90, 1: 6.10, 2: 6.00}  # a seed spread of 0.1 around the reference
    for s, ref in seeds.items():
        child(client, exp, pid, f"row=slide,seed={s}", "row=slide", 0,
              metrics={**finals(1.0, ref), "final/test_bits_per_token": ref + 0.1, "final/val_targets": 5000})
        child(client, exp, pid, f"row=rec,seed={s}", "row=rec", 1,
              metrics={**finals(1.0, ref - 0.03 + 0.001 * s), "final/val_targets": 5000})
        child(client, exp, pid, f"row=xl,seed={s}", "row=xl", 2,
              metrics={**finals(1.0, ref + (0.2, -0.15, 0.05)[s]), "final/val_targets": 5000})
    child(client, exp, pid, "row=one,seed=0", "row=one", 3, metrics={**finals(1.0, 5.7), "final/val_targets": 5000})
    rep = collect.build("pairs", tmp_path, uri=store["uri"])
    slide, rec, xl, one = rep.rows
    assert rec.delta.stat.mean == pytest.approx(-0.029) and rec.delta.stat.n == 3 and rec.delta.resolved
    assert xl.delta.stat.mean == pytest.approx(1 / 30) and not xl.delta.resolved
    assert rec.bits_per_token.std > abs(rec.delta.stat.mean)  # unpaired, the seeds' spread would hide it
    assert one.delta.resolved is None and tables.delta_text(one.delta) == "-0.200 (1 seed: no spread)"
    assert tables.delta_text(slide.delta) == "reference" and slide.test_bits_per_token.mean == pytest.approx(6.1)
    lines = {ln.split(" | ")[0]: ln.split(" | ") for ln in main_table(rep.markdown)}
    assert lines["| `row=rec`"][6] == "-0.0290 [-0.0315, -0.0265]"  # 0.029 ± 4.303 · 0.001 / √3
    assert lines["| `row=xl`"][6] == "≈ +0.0333 [-0.4029, +0.4695]"  # 0.0333 ± 4.303 · 0.1756 / √3
    assert lines["| `row=one`"][5] == "5.700"  # three decimals without a spread
    # the evidence: every pair, the interval, and the seeds a difference of this size and spread would need
    evidence = {tuple(ln.split(" | ")[:2]): ln.split(" | ")[2:] for ln in rep.markdown.splitlines()
                if ln.startswith("| `") and ln not in main_table(rep.markdown)}
    assert evidence[("| `row=xl`", "bits/token")] == [
        "0: +0.200, 1: -0.150, 2: +0.050", "+0.0333", "[-0.4029, +0.4695]", "not resolved; 110 seeds would |"]
    assert evidence[("| `row=rec`", "bits/token")][-1] == "resolved |"
    assert ("| `row=rec`", "test bits/token") not in evidence  # rec logged no test bits: nothing to pair
    assert xl.delta.seeds_needed == 110 and rec.delta.seeds_needed is None
    assert "Every cell scored the same 5,000 validation targets." in rep.markdown


def test_each_invocation_keeps_its_report_folder_and_latest_points_at_the_newest(store, tmp_path, monkeypatch):
    monkeypatch.setattr(collect, "REPORTS_DIR", tmp_path / "reports")
    client = store["client"]
    exp = client.create_experiment("lrexp-twice", artifact_location=str(store["root"] / "art"))
    first = parent(client, exp, "twice", invoked=1_000)
    child(client, exp, first, "a=1", "a=1", 0, metrics=finals(1.0, 3.0))
    collect.build("twice", uri=store["uri"])
    second = parent(client, exp, "twice", invoked=2_000)
    child(client, exp, second, "a=2", "a=2", 0, metrics=finals(1.0, 2.0))
    rep = collect.build("twice", uri=store["uri"])
    folder = tmp_path / "reports" / "twice"
    assert rep.files[0] == folder / second / "table.md"
    assert "`a=1`" in (folder / first / "table.md").read_text()  # the ad-hoc run did not overwrite it
    assert (folder / "latest").resolve() == (folder / second).resolve()


def test_single_runs_compare_by_id_and_by_experiment(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-singles", artifact_location=str(store["root"] / "art"))
    ids = {}
    for name, row, bpt in (("xl", "XL:512", 3.2), ("slide", "Slide:13L", 3.0), ("rec", "Rec:fixed:skip", 2.9)):
        tags = {"lrexp.row": row, **({"lrexp.row_preset": "slide13"} if name == "slide" else {})}
        run_id = client.create_run(exp, run_name=name, tags=tags).info.run_id
        client.log_param(run_id, "train.seed", "0")
        for k, v in finals(0.5 if name == "slide" else 0.6, bpt).items():
            client.log_metric(run_id, k, v, step=4)
        client.set_terminated(run_id, "FINISHED")
        ids[name] = run_id
    by_id = collect.build_runs([ids["xl"], ids["slide"]], out_dir=tmp_path / "ids", uri=store["uri"])
    assert [r.group for r in by_id.rows] == ["xl", "slide"] and by_id.reference == "slide"
    assert by_id.rows[0].delta.stat.mean == pytest.approx(0.2)
    by_exp = collect.build_runs(experiment="lrexp-singles", out_dir=tmp_path / "exp", uri=store["uri"],
                               reference="rec")
    assert [r.group for r in by_exp.rows] == ["xl", "slide", "rec"] and by_exp.reference == "rec"
    assert by_exp.rows[1].step_time_rel.mean == pytest.approx(0.5 / 0.6)
    assert (tmp_path / "exp" / "table.md").is_file()
    with pytest.raises(ReportError, match="no MLflow run 'nope'"):
        collect.build_runs(["nope"], out_dir=tmp_path / "x", uri=store["uri"])
    with pytest.raises(ReportError, match="no MLflow experiment 'gone'"):
        collect.build_runs(experiment="gone", out_dir=tmp_path / "x", uri=store["uri"])


def test_single_runs_at_tiny_scale_take_slide13_as_reference(store, tmp_path, capsys):
    """The step-time reference is a row preset, which every run trained from one carries: at tiny scale
    slide13 is Slide:5L, and `lrexp report --runs` still takes it (not the first run) as the reference."""
    client = store["client"]
    exp = client.create_experiment("lrexp-tiny", artifact_location=str(store["root"] / "art"))
    ids = {}
    for row, step_time in (("xl512", 0.6), ("slide13", 0.3)):
        cfg = load(overrides=["scale=tiny", f"row={row}"])
        run_id = client.create_run(exp, run_name=row, tags=run_tags(cfg)).info.run_id  # as `lrexp train` tags it
        client.log_param(run_id, "train.seed", "0")
        for k, v in finals(step_time, 3.0).items():
            client.log_metric(run_id, k, v, step=4)
        client.set_terminated(run_id, "FINISHED")
        ids[row] = run_id
    assert client.get_run(ids["slide13"]).data.tags["lrexp.row"] == "Slide:5L"
    code = cli.main(["report", "--runs", ids["xl512"], ids["slide13"], "--out", str(tmp_path),
                     "--tracking-uri", store["uri"]])
    assert code == 0 and "relative to `slide13` (1.00 = 0.3 s)" in capsys.readouterr().out
    rows, ref = collect.aggregate(collect.build_runs([ids["xl512"], ids["slide13"]], out_dir=tmp_path,
                                                   uri=store["uri"]).cells, None)
    assert ref == "slide13" and rows[0].step_time_rel.mean == pytest.approx(2.0)


def test_the_report_says_why_a_plot_is_missing(store, tmp_path):
    client = store["client"]
    exp = client.create_experiment("lrexp-short", artifact_location=str(store["root"] / "art"))
    pid = parent(client, exp, "short")
    run_id = child(client, exp, pid, "window=4", "window=4", 0, metrics=finals(0.2, 3.0))  # no curve, no buckets
    client.log_param(run_id, "train.max_steps", "30")
    client.log_param(run_id, "train.val_every", "100")
    rep = collect.build("short", tmp_path, uri=store["uri"])
    assert "No `val_bits_per_token.png`: no finished cell logged `val/bits_per_token` during training: validation " \
           "runs every `train.val_every` steps and the cells stopped before the first (max_steps 30 < val_every 100)" \
        in rep.markdown
    assert "No `loss_by_position.png`: no finished cell logged the final pass's loss by position" in rep.markdown
    assert not (tmp_path / "val_bits_per_token.png").exists()
