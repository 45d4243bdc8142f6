"""The MLflow UI's view of a grid invocation (tracking/view.py): the saved view the printed link opens."""

from __future__ import annotations

from types import SimpleNamespace
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from mlflow.tracking import MlflowClient

from lrexp.report.collect import collect
from lrexp.tracking import view

PARENT = "0123456789abcdef0123456789abcdef"
METRICS = {"final/params": 1, "final/val_bits_per_token": 1, "final/tokens_seen": 1, "train/loss": 40,
           "val/loss": 4, "val/bits_per_token": 4, "val/bits_per_token_by_pos/0-64": 4, "perf/step_time_s": 40}


def test_view_state_filters_the_invocation_and_puts_the_comparison_first():
    state = view.view_state(PARENT, METRICS, runs=12)
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{PARENT}'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`final/val_bits_per_token`", True)  # best first
    assert state["selectedColumns"] == [
        "metrics.`final/val_bits_per_token`", "metrics.`final/val_bits_per_token_minus_ref`",
        "metrics.`final/test_bits_per_token`", "metrics.`final/step_time_s`", "metrics.`final/params`"]
    assert state["runsHiddenMode"] == "SHOW_ALL" and state["isAccordionReordered"] is True
    sections = [s["name"] for s in state["compareRunSections"]]
    assert sections == ["val", "val/bits_per_token_by_pos", "final", "train", "perf"]
    charts = state["compareRunCharts"]
    first = charts[0]
    assert (first["metricKey"], first["type"]) == ("val/bits_per_token", "LINE")  # the validation curve first
    assert first["metricSectionId"] == state["compareRunSections"][0]["uuid"]
    kinds = {c["metricKey"]: (c["type"], c["deleted"]) for c in charts}
    assert kinds["final/val_bits_per_token"] == ("BAR", False) and kinds["final/tokens_seen"] == ("BAR", True)
    assert [c["metricKey"] for c in charts].index("val/loss") == 1
    assert all(c["runsCountToCompare"] == 12 for c in charts)


def test_the_tag_holds_the_state_and_the_link_its_key():
    state = view.view_state(PARENT, METRICS, runs=2)
    assert view.read_state(view.tag_value("table · 2026-12-04", state, now_ms=5)) == state
    url = view.link("http://127.0.0.1:5000", "3", PARENT)
    opened = urlparse(url)
    assert opened.path == view.OPEN_PATH  # through lrexp ui's page: Model training for the runs opened from it
    to = unquote(parse_qs(opened.query)["to"][0])
    assert to.startswith("/experiments/3/runs?") and f"viewStateShareKey=lrexp-{PARENT}" in to
    assert "workflowType=machine_learning" in to and "searchFilter" not in to  # a facet in the URL beats the view
    served = view.link("http://mlflow.lab:5000", "3", PARENT, charts=True, lrexp_ui=False)
    assert served.startswith("http://mlflow.lab:5000/#/experiments/3/runs?") and "compareRunsMode=CHART" in served
    assert view.ui_base("http://mlflow.lab:5000/") == ("http://mlflow.lab:5000", False)
    assert view.ui_base("sqlite:///x/mlflow.db", port=5001) == ("http://127.0.0.1:5001", True)


def _cell(run_id, group, seed, bpt, status="FINISHED"):
    return SimpleNamespace(run_id=run_id, group=group, seed=seed, status=status,
                           metrics={"final/val_bits_per_token": bpt})


def test_differences_are_paired_by_seed():
    cells = [_cell("r0", "row=slide13", "0", 8.0), _cell("r1", "row=slide13", "1", 9.0),
             _cell("a0", "row=rec", "0", 7.5), _cell("a1", "row=rec", "1", 8.75),
             _cell("b0", "row=xl", "2", 7.0), _cell("c0", "row=full", "0", 1.0, status="FAILED")]
    assert view.differences(cells, "row=slide13") == {"r0": 0.0, "r1": 0.0, "a0": -0.5, "a1": -0.25}


@pytest.mark.slow  # a new MLflow SQLite store: its migrations take seconds
def test_publish_writes_the_view_and_the_differences(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("lrexp-table")
    parent = client.create_run(exp, run_name="table · 2026-12-04 17:20", tags={
        "lrexp.role": "parent", "lrexp.grid": "table", "lrexp.reference": "row=slide13"}).info.run_id
    for index, (group, bpt) in enumerate([("row=slide13", 8.0), ("row=rec", 7.5)]):
        run = client.create_run(exp, run_name=group, tags={
            "mlflow.parentRunId": parent, "lrexp.cell": f"{group},seed=0", "lrexp.group": group,
            "lrexp.cell_index": str(index)}).info.run_id
        client.log_param(run, "train.seed", "0")
        for step, v in enumerate([9.0, 8.5, bpt]):
            client.log_metric(run, "val/bits_per_token", v, step=step)
        client.log_metric(run, "final/val_bits_per_token", bpt)
        client.set_terminated(run)
    url = view.publish(client, client.get_run(parent), collect(client, client.get_run(parent)), "http://h:1")
    assert f"lrexp-{parent}" in unquote(url)
    state = view.read_state(client.get_experiment(exp).tags[f"mlflow.sharedViewState.lrexp-{parent}"])
    assert state["compareRunCharts"][0]["metricKey"] == "val/bits_per_token"
    assert state["compareRunCharts"][0]["type"] == "LINE"
    kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    deltas = {r.info.run_name: r.data.metrics[view.FINAL_DELTA] for r in kids}
    assert deltas == {"row=slide13": 0.0, "row=rec": pytest.approx(-0.5)}
