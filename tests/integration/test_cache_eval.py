"""`lrexp eval` and the `cache` grid end to end at smoke scale, on a byte-level corpus of a few short documents.

A Full row trains two steps; `lrexp eval` of its checkpoint must score exactly the targets of the training's
final test pass, its `full` setting must give the final pass's bits/token (the topline is the native model),
and its MLflow runs must hold the contract. Rows the policies do not apply to, and bad budgets, are one-line
errors before any work.
"""

from __future__ import annotations

import pytest
import yaml
import torch
from mlflow.tracking import MlflowClient

from corpora import word_documents
from lrexp import cli
from lrexp.config.load import load, to_dict
from lrexp.train import run as train
from lrexp.lit.module import CHECKPOINT_META_KEY


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    corpus = word_documents(root / "corpus", "a bounded cache keeps some rows of every layer and drops the rest",
                            [30 + 7 * i for i in range(12)])
    uri = f"sqlite:///{root}/mlflow.db"
    base = ["scale=smoke", f"data.corpus={corpus}", "data.tokenizer=bytes", "data.val_fraction=0.25",
            "data.test_fraction=0.25", f"data.cache_dir={root / 'data'}", f"log.tracking_uri={uri}",
            "log.progress_bar=false", f"train.checkpoint_dir={root / 'ckpt'}", "train.accelerator=cpu",
            "train.max_steps=2", "train.val_every=2", "train.val_tokens=256"]
    result = train.run(load(overrides=[*base, "row=full"]))
    return {"root": root, "uri": uri, "base": base, "client": MlflowClient(uri), "trained": result}


def test_eval_scores_the_final_pass_targets_and_full_is_the_native_model(env, capsys):
    trained = env["trained"]
    out = env["root"] / "report"
    code = cli.main(["eval", trained["checkpoint"], "--policy", "sinks", "tova", "--budget", "8", "--mode", "block",
                     "--block", "4", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "| tova | 8 |" in printed.out and (out / "table.csv").is_file() and (out / "bits_vs_budget.png").is_file()
    client = env["client"]
    exp = client.get_experiment_by_name("lrexp")
    runs = client.search_runs([exp.experiment_id], f"tags.`lrexp.checkpoint_run` = '{trained['run_id']}'")
    parent = [r for r in runs if r.data.tags["lrexp.role"] == "eval"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    kids = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert set(kids) == {"full", "sinks:8", "tova:8"} and all(k.info.status == "FINISHED" for k in kids.values())
    full, tova = kids["full"].data, kids["tova:8"].data
    assert full.metrics["eval/targets"] == trained["final/test_targets"]  # the same scored targets
    assert full.metrics["eval/bits_per_token"] == pytest.approx(trained["final/test_bits_per_token"], abs=1e-4)
    assert full.metrics["eval/gap_all"] == 0.0 and "eval/beyond_bits_per_token" in tova.metrics
    assert tova.params["mode"] == "block" and tova.params["granularity"] == "layer" and tova.params["mask"] == "exclude_self"
    assert tova.metrics["perf/tokens_per_s"] > 0 and tova.metrics["perf/cache_bytes_per_lane"] > 0


def test_rows_the_policies_do_not_apply_to_and_bad_budgets_fail_before_any_work(env, capsys):
    rec = load(overrides=[*env["base"], "row=rec_fixed_skip"])
    fake = env["root"] / "rec.ckpt"  # never read past its config: the row is refused first
    torch.save({CHECKPOINT_META_KEY: {"config": to_dict(rec), "vocab_size": 257, "run_id": "r"},
                "state_dict": {}}, fake)
    assert cli.main(["eval", str(fake), "--policy", "tova", "--budget", "8"]) == 2
    assert "this one has recurrent layers" in capsys.readouterr().err
    checkpoint = env["trained"]["checkpoint"]
    assert cli.main(["eval", checkpoint, "--policy", "sinks", "--budget", "4"]) == 2
    assert "needs a budget C > 4" in capsys.readouterr().err
    assert cli.main(["eval", checkpoint, "--policy", "lru", "--budget", "8"]) == 2
    assert "allowed: full, h2o, sinks, tova, window" in capsys.readouterr().err
    assert cli.main(["eval", checkpoint, "model.window=4"]) == 2
    assert "cannot be changed at evaluation" in capsys.readouterr().err
    # overrides before or after the options alike
    assert cli.main(["eval", checkpoint, "policy.sinks=2", "--policy", "sinks", "--budget", "2"]) == 2
    assert "pins 2 rows" in capsys.readouterr().err
    assert cli.main(["eval", checkpoint, "--policy", "sinks", "--mode", "block", "policy.sinks=3", "--budget", "3"]) == 2
    assert "pins 3 rows" in capsys.readouterr().err


def test_a_row_without_kv_caches_is_evaluated_by_its_own_forward_when_no_policy_is_asked(env, capsys):
    """A Rec row: `lrexp eval` without policies runs the model's forward over the same pass (`full`)."""
    from lrexp.model.lm import build_model

    cfg = load(overrides=[*env["base"], "row=rec_fixed_skip"])
    vocab = torch.load(env["trained"]["checkpoint"], weights_only=True)[CHECKPOINT_META_KEY]["vocab_size"]
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    path = env["root"] / "rec-weights.ckpt"
    torch.save({CHECKPOINT_META_KEY: {"config": to_dict(cfg), "vocab_size": vocab, "run_id": "rec"},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    assert cli.main(["eval", str(path), "--out", str(env["root"] / "rec-report")]) == 0
    assert "| full | full |" in capsys.readouterr().out
    runs = env["client"].search_runs([env["client"].get_experiment_by_name("lrexp").experiment_id],
                                     "tags.`lrexp.checkpoint_run` = 'rec' and tags.`lrexp.role` = 'eval-setting'")
    assert len(runs) == 1 and runs[0].data.metrics["eval/targets"] == env["trained"]["final/test_targets"]


def test_a_grid_evaluate_section_is_checked_before_any_cell_trains(tmp_path):
    from lrexp.grid.expand import expand
    from lrexp.grid.spec import GridError

    path = tmp_path / "g.yaml"
    for section, error in (({"model.window": 4}, "is not a policy.* key"),
                           ({"policy.names": ["sinks"], "policy.budgets": {"smoke": [4]}}, "needs a budget C > 4"),
                           ({"policy.names": ["tova"], "policy.budgets": {"tiny": [8]}}, "no value for scale 'smoke'")):
        path.write_text(yaml.safe_dump({"base": {"scale": "smoke"}, "axes": {"row": ["full"]}, "evaluate": section}))
        with pytest.raises(GridError, match=error):
            expand(str(path))
    # settings scored on different targets are never compared: one K for every cell
    path.write_text(yaml.safe_dump({"base": {"scale": "smoke"}, "axes": {"row": ["full"], "policy.limit": [100, None]},
                                    "evaluate": {"policy.names": ["tova"], "policy.budgets": [8]}}))
    with pytest.raises(GridError, match=r"different targets \(policy.limit .*: K = 100, .*: K = all\)"):
        expand(str(path))
    assert expand("cache", ["scale=smoke"]).evaluate == [
        'policy.names=["window", "sinks", "h2o", "tova"]', "policy.budgets=[8, 16, 32]", "policy.mode=auto"]


@pytest.mark.slow
def test_the_cache_grid_trains_the_topline_then_evaluates_its_checkpoint(env, capsys):
    import argparse

    from lrexp.commands import grid as grid_cmd

    overrides = [o for o in env["base"] if not o.startswith(("scale=", "log.progress_bar"))]
    args = argparse.Namespace(name="cache", overrides=["scale=smoke", *overrides], dry_run=False, resume=False,
                              runs_dir=env["root"] / "runs", out=env["root"] / "grid-report", list=False,
                              new_parent=False, cell=None, parent=None, jobs=None, launcher=None, status=False)
    assert grid_cmd.run(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "| tova | 32 |" in printed and "| window | 8 |" in printed
    client = env["client"]
    exp = client.get_experiment_by_name("lrexp-cache")
    grid_parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("lrexp.role") == "parent"][0]
    evals = client.search_runs([exp.experiment_id], f"tags.`lrexp.grid_parent` = '{grid_parent.info.run_id}'")
    parent = [r for r in evals if r.data.tags["lrexp.role"] == "eval"]
    assert len(parent) == 1 and len(evals) == 1 + 1 + 4 * 3  # the parent, full, 4 policies x 3 budgets
    assert (env["root"] / "grid-report" / "eval" / "row-full" / "bits_vs_budget.png").is_file()


def _evaluate(env, *overrides):
    """{label: Result} of `lrexp eval`'s passes over the trained Full row's test split."""
    from lrexp.eval import passes
    from lrexp.eval.load import load as load_checkpoint

    cfg, model, _ = load_checkpoint(env["trained"]["checkpoint"], ["policy.names=[window,sinks,tova]",
                                                                   "policy.budgets=[8,16]", *overrides])
    dm, info = passes.stream(cfg, "test")
    results = {r.policy.label(): r for r in passes.evaluate(cfg, model, passes.settings(cfg), dm, info)}
    return results, (cfg, model, dm, info)


def _same(a, b, tol=1e-6):
    assert a.stats.keys() == b.stats.keys() and a.beyond.keys() == b.beyond.keys()
    for got, want in [(a.stats, b.stats), *[(a.beyond[c], b.beyond[c]) for c in a.beyond]]:
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key
    assert {d: n for d, (_, n) in a.per_document.items()} == {d: n for d, (_, n) in b.per_document.items()}
    for d, (nll, _) in a.per_document.items():
        assert nll == pytest.approx(b.per_document[d][0], rel=tol)


@pytest.mark.slow  # three passes over the split, one token by token: minutes on a loaded 2-core machine
def test_the_fast_paths_equal_the_reference_decode(env):
    """Packed segments (hundreds of lanes a step), the native topline and auto mode (window and sinks in
    blocks of W) against the reference: every setting token by token, one loader batch a step,
    `full` decoded; the same targets and every number within 1e-6."""
    from lrexp.eval import passes

    fast, _ = _evaluate(env)  # the defaults: auto mode, packed lanes
    reference, (cfg, model, dm, info) = _evaluate(env, "policy.mode=token", "policy.lanes=1")
    (decoded_full,) = passes._one_pass(cfg, model, [passes.settings(cfg)[0]], dm, info)
    assert fast["full"].occupancy[0] > reference["full"].occupancy[0] - 1e-9
    _same(fast["full"], decoded_full)
    for label, result in reference.items():
        _same(fast[label], result)
    window_token = reference["window:8"].per_document
    assert fast["window:8"].per_document == window_token or all(  # block mode is exact: same bits expected
        abs(fast["window:8"].per_document[d][0] - v[0]) <= 1e-6 * abs(v[0]) for d, v in window_token.items())


@pytest.mark.slow  # a whole `lrexp eval` with its MLflow runs: over 10 s here
def test_limit_scores_the_first_k_targets_and_says_so(env, capsys):
    out = env["root"] / "limited"
    code = cli.main(["eval", env["trained"]["checkpoint"], "--policy", "window", "--budget", "8", "64", "--limit",
                     "50", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "window:64: a budget at or above the context T_eval = 64 keeps every row" in printed
    assert "the first K = 50 targets of the fixed evaluation order" in (out / "table.md").read_text()
    client = env["client"]
    runs = client.search_runs([client.get_experiment_by_name("lrexp").experiment_id],
                              "tags.`lrexp.eval.limit` = '50' and tags.`lrexp.role` = 'eval-setting'")
    assert len(runs) == 3 and all(r.data.metrics["eval/targets"] == 50 for r in runs)
    assert all(r.data.params["limit"] == "50" for r in runs)
