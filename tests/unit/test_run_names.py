"""Run names: what the MLflow UI's run list shows (tracking/run_names.py)."""

from __future__ import annotations

import time

from lrexp.tracking.run_names import MAX_CHARS, cell_names, parent_name, standalone_name

SHORT = {"row": "row", "model.window": "window", "model.recurrent.gate": "gate", "train.seed": "seed"}
WHEN = time.mktime((2026, 12, 4, 17, 20, 0, 0, 0, -1))


def test_parent_and_standalone_names_say_what_and_when():
    assert parent_name("table", ["scale=smoke", "train.max_steps=40"], WHEN) == \
        "table · 2026-12-04 17:20 · scale=smoke train.max_steps=40"
    assert parent_name("gates", [], WHEN) == "gates · 2026-12-04 17:20"
    assert len(parent_name("gates", ["x=" + "9" * 300], WHEN)) == MAX_CHARS  # the full list is a tag
    assert standalone_name("Slide:13L", WHEN + 31) == "Slide:13L · 2026-12-04 17:20:31"


def test_cells_name_the_axes_that_vary_and_that_the_row_does_not_say():
    # gates: the row's name already says gate (and topology); the seeds vary and are named
    rows = ["Rec:lstm:dual", "Rec:lstm:dual", "Rec:fixed:dual", "Rec:fixed:dual"]
    values = [{"model.recurrent.gate": g, "train.seed": s} for g in ("lstm", "fixed") for s in ("0", "1")]
    assert cell_names(rows, values, SHORT) == ["Rec:lstm:dual seed=0", "Rec:lstm:dual seed=1",
                                               "Rec:fixed:dual seed=0", "Rec:fixed:dual seed=1"]
    # window: Slide:13L's name does not say the window; the preset axis is never named, one seed is not
    rows = ["Slide:13L", "Slide:13L", "Rec:fixed:skip", "Rec:fixed:skip"]
    values = [{"row": r, "model.window": w, "train.seed": "0"}
              for r in ("slide13", "rec_fixed_skip") for w in ("4", "8")]
    assert cell_names(rows, values, SHORT, skip=["row"]) == [
        "Slide:13L window=4", "Slide:13L window=8", "Rec:fixed:skip window=4", "Rec:fixed:skip window=8"]
    # two presets of one paper name: the preset is named after all
    rows, values = ["XL:8", "XL:8"], [{"row": "xl512"}, {"row": "xl_custom"}]
    assert cell_names(rows, values, SHORT, skip=["row"]) == ["XL:8 row=xl512", "XL:8 row=xl_custom"]
