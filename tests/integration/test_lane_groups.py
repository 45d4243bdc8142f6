"""Lane groups (`train.lane_groups`) and ranks (`train.devices`): an optimiser step over G groups or G ranks of
B lanes is one step over G x B lanes.

The paper's 32 lanes per step need not fit on one device at once: each group is a micro-batch with its own
carried state, and the loss of every micro-batch is divided by the targets of the whole step, so the
gradient is the same token mean. Dropout is off: the groups draw their masks per micro-batch.
"""

from __future__ import annotations

import pytest
import torch

from corpora import word_documents
from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.train import run as train
from lrexp.lit.checkpoint import CheckpointError

# fp32: a batch of 2 lanes and one of 4 take different kernel paths, so sums are associated differently; after
# three steps the states of an AMD EPYC machine differ by up to 1.2e-6 at magnitudes near 2 (five ulps), while a
# per-group or per-rank token mean moves parameters by 1e-3. Hence an absolute floor and a relative part.
TOL = 1e-6
RTOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    corpus = word_documents(  # 20 to 700 bytes: documents end inside segments, so groups carry unequal targets
        root / "corpus", "lanes of a step read different documents so that the gradient of one step sees more text",
        [4 + (i * 7) % 24 * 6 for i in range(24)], name="doc{i:02d}.txt", end="")
    uri = f"sqlite:///{root}/mlflow.db"
    return {"root": root, "base": [
        "scale=smoke", "row=rec_fixed_skip", f"data.corpus={corpus}", "data.tokenizer=bytes",
        "data.val_fraction=0.15", "data.test_fraction=0.15", f"data.cache_dir={root / 'data'}",
        "data.tokens_per_step=256",  # 4 lanes of N = 64
        "model.dropout=0", f"log.tracking_uri={uri}", "log.experiment=lrexp-groups", "log.progress_bar=false",
        f"train.checkpoint_dir={root / 'ckpt'}", "train.accelerator=cpu", "train.max_steps=3", "train.val_every=2",
        "train.val_tokens=128",
    ]}


def run(env, *overrides, resume=None):
    if resume is None:
        return train.run(load(overrides=[*env["base"], *overrides]))
    cfg, path = train.resume_config(resume, [], list(overrides))
    return train.run(cfg, resume=str(path))


@pytest.fixture(scope="module")
def one_group(env):
    """The uninterrupted run both the groups and the ranks test compare against: 4 lanes in one micro-batch."""
    return run(env, "train.lane_groups=1")


def saved(result):
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["lrexp_carried_state"]["tensors"]


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=tol, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


def test_two_groups_of_b_lanes_step_as_2b_lanes_and_resume_exactly(env, one_group):
    whole = one_group
    groups = run(env, "train.lane_groups=2")
    assert load(overrides=[*env["base"], "train.lane_groups=2"]).derived.lanes_per_group == 2
    (w_params, w_state), (g_params, g_state) = saved(whole), saved(groups)
    assert_close(g_params, w_params, TOL)  # parameters after 3 optimiser steps
    assert_close(g_state, w_state, TOL)  # each group's carried state is its lanes' rows of the 4-lane state
    assert g_state["layers.1.recurrent.c"].shape[1] == 4  # [world, lanes, S, d], in lane order
    assert groups["final/tokens_seen"] == whole["final/tokens_seen"] == 3 * 256

    # interrupted after step 2 and resumed: exactly the uninterrupted run; another grouping is refused
    first = run(env, "train.lane_groups=2", "train.max_steps=2")
    again = run(env, "train.max_steps=3", resume=first["checkpoint"])
    assert_close(saved(again)[0], g_params, 0.0)
    assert_close(saved(again)[1], g_state, 0.0)
    with pytest.raises(CheckpointError, match="train.lane_groups=2, this run has 1"):
        run(env, "train.max_steps=3", "train.lane_groups=1", resume=first["checkpoint"])


def test_memory_slots_step_in_groups_and_resume_exactly(env):
    """The slots' carry (a SlotState per enabled layer) goes through lane groups, checkpoints and resume like
    every state: two groups interrupted after step 2 and resumed are one group of 4 lanes for 3 steps."""
    slots = ("row=slide12", "model.slots.enabled=true", "model.slots.layers=[0,2]", "model.slots.n=4")
    whole = saved(run(env, *slots))
    first = run(env, *slots, "train.lane_groups=2", "train.max_steps=2")
    again = saved(run(env, "train.max_steps=3", resume=first["checkpoint"]))
    assert_close(again[0], whole[0], TOL)
    assert_close(again[1], whole[1], TOL)
    assert whole[1]["layers.2.slots.c"].shape[1:3] == (4, 4)  # [world, lanes, n, d]


def test_offloaded_group_states_change_nothing(env):
    plain = saved(run(env, "train.lane_groups=2", "train.max_steps=2"))
    offloaded = saved(run(env, "train.lane_groups=2", "train.max_steps=2", "train.offload_state=true"))
    assert_close(offloaded[0], plain[0], 0.0)
    assert_close(offloaded[1], plain[1], 0.0)


def test_lanes_must_divide_over_devices_and_groups(env):
    with pytest.raises(ConfigError, match=r"4 lanes .* do not divide over 1 rank\(s\) x 3 lane group"):
        load(overrides=[*env["base"], "train.lane_groups=3"])


def test_two_ranks_of_b_lanes_step_as_2b_lanes(env, one_group):
    """DDP on 2 CPU ranks (ddp_fork): the same parameters as one process reading all 4 lanes, each rank's
    carried state its own lanes' rows (DDP's buffer broadcast cannot clobber it), one MLflow run."""
    from mlflow.tracking import MlflowClient

    whole = one_group
    ranks = run(env, "train.devices=2", "train.strategy=ddp_fork")
    (w_params, w_state), (r_params, r_state) = saved(whole), saved(ranks)
    assert_close(r_params, w_params, TOL)
    lanes = {k: v for k, v in r_state.items() if k.startswith("layers.")}  # not the layer count, batch size
    for key, value in lanes.items():  # [ranks, 2, ...] against [1, 4, ...]: rank r holds lanes 2r, 2r + 1
        assert value.shape[:2] == (2, 2)
        torch.testing.assert_close(value.flatten(0, 1), w_state[key].flatten(0, 1), rtol=RTOL, atol=TOL, msg=key)
    c = r_state["layers.1.recurrent.c"]
    assert not torch.equal(c[0], c[1])  # the ranks carry different documents
    client = MlflowClient(load(overrides=env["base"]).log.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("lrexp-groups").experiment_id],
                              filter_string="params.`train.devices` = '2'")
    assert [r.info.run_id for r in runs] == [ranks["run_id"]] and runs[0].info.status == "FINISHED"
