"""The MLflow UI's view of one grid invocation (docs/ui.md#how-the-link-does-it): the link `lrexp ui` and a
grid print opens the experiment's runs on the invocation's cells, the final metrics as columns, best first,
and the validation curves as the first charts.

MLflow 3's experiment page keeps its view (search filter, sort, columns, charts and their sections) as a
"saved view": an experiment tag `mlflow.sharedViewState.<key>` holding `{name, createdAt, updatedAt, state}`,
`state` being the page's state as JSON text (or `deflate;` + base64 of it). `?viewStateShareKey=<key>` in
the page's address loads it, unless the address also carries a search facet (`searchFilter`, `orderByKey`,
...), which wins; the view also appears by its name in the page's Views menu. One view per invocation,
rewritten whenever it is published, so it lists the metrics its runs have now.

The cells' difference to the reference row is a column too: `final/val_bits_per_token_minus_ref`, each
cell's bits/token minus the reference group's run of the same seed (equal seeds share data order and
initialisation), logged on the cell's run when the view is published.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
import zlib
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote

from lrexp.tracking.names import (
    FINAL_BPT, FINAL_PARAMS, FINAL_STEP_TIME, FINAL_TEST_BPT, TAG_GRID, TAG_PARENT, TAG_REFERENCE, VAL_BPT,
)

OPEN_PATH = "/lrexp/open"  # lrexp ui's page that opens the UI in Model-training mode (tracking/ui_app.py)
VIEW_TAG = "mlflow.sharedViewState."  # + the view's key: what the UI reads for ?viewStateShareKey=<key>
FINAL_DELTA = "final/val_bits_per_token_minus_ref"  # a cell's bits/token minus the reference's, same seed
DEFLATED = "deflate;"  # the UI's prefix of a compressed state: zlib, then base64
RUN_NAME_COLUMN = "attributes.`Run Name`"
# The table's columns, in order: the comparison first (run names say the cell, docs/ui.md#run-names)
COLUMNS = [FINAL_BPT, FINAL_DELTA, FINAL_TEST_BPT, FINAL_STEP_TIME, FINAL_PARAMS]
# Chart sections in this order; a metric's section is its name up to the last "/", as the UI groups them.
SECTION_ORDER = ["val", "val/bits_per_token_by_pos", "final", "train", "perf"]
FIRST_CHARTS = [VAL_BPT, "val/bits_per_byte", "val/loss"]  # the curves to read first, in this order
SHOWN_FINALS = COLUMNS  # the `final/*` bar charts shown; the other finals are in the table and the report


def view_key(parent_id: str) -> str:
    return f"lrexp-{parent_id}"


def ui_base(uri: str, host: str = "127.0.0.1", port: int = 5000) -> Tuple[str, bool]:
    """(the UI's address for a store, whether `lrexp ui` serves it): a tracking server is its own UI."""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/"), False
    return f"http://{host}:{port}", True


def link(base: str, experiment_id: str, parent_id: str, charts: bool = False, lrexp_ui: bool = True) -> str:
    """The experiment's runs page opened on the invocation's view (`charts`: on its chart view), in Model
    training mode: the 3.17 UI takes its mode from `workflowType` in the address, else from the browser's
    last choice (GenAI at first), whatever the experiment's `mlflow.experimentKind` says. Through `lrexp ui`
    the link passes by its page that stores the choice, so the runs opened from there stay in it too."""
    route = (f"/experiments/{experiment_id}/runs?viewStateShareKey={view_key(parent_id)}"
             f"&compareRunsMode={'CHART' if charts else 'TABLE'}&workflowType=machine_learning")
    return f"{base}{OPEN_PATH}?to={quote(route, safe='')}" if lrexp_ui else f"{base}/#{route}"


def _section(name: str) -> str:
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _section_rank(name: str) -> tuple:
    return (SECTION_ORDER.index(name) if name in SECTION_ORDER else len(SECTION_ORDER), name)


def _chart_rank(key: str) -> tuple:
    return (FIRST_CHARTS.index(key) if key in FIRST_CHARTS else len(FIRST_CHARTS), key)


def charts(metrics: Mapping[str, int], runs: int) -> Dict[str, list]:
    """`compareRunCharts` and `compareRunSections` for the metrics the runs have (key -> how many values a
    run's history of it holds): a line chart per curve, a bar chart per one-value metric, sections and charts
    in reading order, every section marked as placed by hand so that the UI keeps the order and appends
    what it finds later. `final/*` beyond the table's columns start hidden (the UI's chart menu adds them)."""
    names = sorted({_section(k) for k in metrics}, key=_section_rank)
    sections = [{"uuid": uuid.uuid4().hex, "name": n, "display": True, "isReordered": True, "deleted": False,
                 "isGenerated": False} for n in names]
    section_id = {s["name"]: s["uuid"] for s in sections}
    cards = []
    for key in sorted(metrics, key=lambda k: (_section_rank(_section(k)), _chart_rank(k))):
        card = {"uuid": uuid.uuid4().hex, "metricSectionId": section_id[_section(key)], "metricKey": key,
                "runsCountToCompare": max(10, runs), "isGenerated": False,
                "deleted": key.startswith("final/") and key not in SHOWN_FINALS}
        if metrics[key] > 1:
            card.update(type="LINE", lineSmoothness=0, xAxisKey="step", xAxisScaleType="linear",
                        scaleType="linear", selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[],
                        ignoreOutliers=False, useGlobalXaxisKey=True, useGlobalLineSmoothing=True)
        else:
            card["type"] = "BAR"
        cards.append(card)
    return {"compareRunCharts": cards, "compareRunSections": sections}


def view_state(parent_id: str, metrics: Mapping[str, int], runs: int) -> dict:
    """The experiment page's state for the invocation: its search facets and its UI state."""
    return {
        "searchFilter": f"tags.`{TAG_PARENT}` = '{parent_id}'",
        "orderByKey": f"metrics.`{FINAL_BPT}`",
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [f"metrics.`{k}`" for k in COLUMNS],
        # the page sorts metric columns by name unless given an order
        "columnOrder": [RUN_NAME_COLUMN, *(f"metrics.`{k}`" for k in COLUMNS), "runDateAndNestInfo", "duration"],
        # a cell's name whole (its row and the axis values that vary), the metrics' names whole
        "columnWidths": {RUN_NAME_COLUMN: 300, **{f"metrics.`{k}`": 190 for k in COLUMNS}},
        "runsHiddenMode": "SHOW_ALL",  # the UI's default charts only the first 10 runs
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": True,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
        **charts(metrics, runs),
    }


def tag_value(name: str, state: dict, now_ms: Optional[int] = None) -> str:
    """The saved-view envelope the UI reads from the tag, its state deflated (a chart per metric outgrows an
    experiment tag's 20,000 characters as JSON)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    packed = DEFLATED + base64.b64encode(zlib.compress(json.dumps(state).encode())).decode()
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": packed})


def read_state(value: str) -> dict:
    """The state in a view tag's value, as the UI reads it."""
    state = json.loads(value)["state"]
    if state.startswith(DEFLATED):
        state = zlib.decompress(base64.b64decode(state[len(DEFLATED):])).decode()
    return json.loads(state)


def differences(cells: Iterable, reference: str) -> Dict[str, float]:
    """run id -> its final bits/token minus that of the reference group's run with the same seed, for the
    finished cells (anything with `run_id`, `group`, `seed`, `status`, `metrics`, as report.collect's)."""
    done = [c for c in cells if c.status == "FINISHED" and FINAL_BPT in c.metrics]
    ref = {c.seed: c.metrics[FINAL_BPT] for c in done if c.group == reference}
    return {c.run_id: c.metrics[FINAL_BPT] - ref[c.seed] for c in done if c.seed in ref}


def publish(client, parent, cells: Sequence, base: str, lrexp_ui: bool = True) -> str:
    """Log each cell's difference to the reference, write the invocation's view, return its link."""
    for run_id, value in differences(cells, parent.data.tags.get(TAG_REFERENCE, "")).items():
        client.log_metric(run_id, FINAL_DELTA, value)
    parent_id = parent.info.run_id
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{parent_id}'",
                              max_results=10000)
    lengths: Dict[str, int] = {}
    for run in runs:
        for key in run.data.metrics:
            if key not in lengths:  # one history per key is enough: every cell logs on the same cadence
                lengths[key] = len(client.get_metric_history(run.info.run_id, key))
    name = parent.info.run_name or f"{parent.data.tags.get(TAG_GRID, 'grid')} {parent_id[:8]}"
    state = view_state(parent_id, lengths, len(runs))
    client.set_experiment_tag(parent.info.experiment_id, VIEW_TAG + view_key(parent_id), tag_value(name, state))
    return link(base, parent.info.experiment_id, parent_id, lrexp_ui=lrexp_ui)
