"""Multi-node DDP on one machine: a cell with `train.num_nodes=2 train.devices=1` started as two `lrexp train`
processes with the environment srun gives each task of a two-node job (SLURM_NTASKS, SLURM_PROCID,
SLURM_NODEID, ...; the rendezvous on 127.0.0.1, as the job script exports it), so that Lightning's SLURM
environment is what assigns the ranks, over gloo on the CPU.

It must step as one process reading the same global lanes (within the fp32 tolerance of
tests/integration/test_lane_groups.py), log one MLflow run, and resume exactly: two steps, then `--resume` to
three, equal to three straight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from corpora import word_documents
from lrexp.config.load import load
from lrexp.tracking.server import free_port
from lrexp.train import run as train

# four lanes over two ranks: fp32 sums associate differently in a batch of 2 and one of 4 (test_lane_groups.py)
TOL = 1e-6
RTOL = 1e-5

# two processes rendezvous, train and run the final passes, three times: minutes on a loaded 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    corpus = word_documents(
        root / "corpus", "two nodes each read their own lanes and average one gradient per step over both",
        [4 + (i * 7) % 24 * 6 for i in range(24)], name="doc{i:02d}.txt", end="")
    uri = f"sqlite:///{root}/mlflow.db"
    base = [
        "scale=smoke", "row=rec_fixed_skip", f"data.corpus={corpus}", "data.tokenizer=bytes",
        "data.val_fraction=0.15", "data.test_fraction=0.15", f"data.cache_dir={root / 'data'}",
        "data.tokens_per_step=256",  # 4 lanes of N = 64
        "model.dropout=0", f"log.tracking_uri={uri}", "log.experiment=lrexp-nodes", "log.progress_bar=false",
        "log.every_n_steps=1",
        f"train.checkpoint_dir={root / 'ckpt'}", "train.accelerator=cpu", "train.max_steps=3", "train.val_every=2",
        "train.val_tokens=128",
    ]
    return {"root": root, "base": base, "client": MlflowClient(uri)}


def srun_env(rank: int, port: int) -> dict:
    """What srun sets for task `rank` of a job of two nodes with one task each, and the job script's
    rendezvous; nothing of torchrun's."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_", "GROUP_RANK"))}
    return {
        **env,
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lrexp-nodes", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2", "SLURM_NODELIST": "node[0-1]", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
    }


def two_nodes(env, *args: str) -> tuple:
    """`lrexp train ARGS` as the two tasks of a two-node job; (rank 0's final metrics, rank 0's stderr)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "lrexp.cli", "train", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=srun_env(rank, port)) for rank in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[1][0].strip() == ""  # only rank 0 prints the final metrics
    return json.loads(outs[0][0].strip().splitlines()[-1]), outs[0][1]


def saved(result):
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt["lrexp_carried_state"]["tensors"]


@pytest.fixture(scope="module")
def straight(env):
    """Three steps on two nodes, uninterrupted."""
    return two_nodes(env, *env["base"], "train.num_nodes=2", "train.devices=1")


def test_two_nodes_step_as_one_process_with_the_same_lanes_and_log_one_run(env, straight):
    result, err = straight
    assert "MEMBER: 1/2" in err  # Lightning's rendezvous of two ranks, ranks read from SLURM_PROCID
    one = train.run(load(overrides=env["base"]))
    (o_params, o_state), (n_params, n_state) = saved(one), saved(result)
    for key, value in o_params.items():
        torch.testing.assert_close(n_params[key], value, rtol=RTOL, atol=TOL, msg=key)
    for key, value in n_state.items():
        if key.startswith("layers."):  # [ranks, 2 lanes, ...] against [1, 4 lanes, ...]
            assert value.shape[:2] == (2, 2)
            torch.testing.assert_close(value.flatten(0, 1), o_state[key].flatten(0, 1), rtol=RTOL, atol=TOL,
                                       msg=key)
    client = env["client"]
    runs = client.search_runs([client.get_experiment_by_name("lrexp-nodes").experiment_id],
                              filter_string="params.`train.num_nodes` = '2'")
    assert [r.info.run_id for r in runs] == [result["run_id"]] and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["final/steps"] == 3
    assert abs(runs[0].data.metrics["final/val_bits_per_token"] - one["final/val_bits_per_token"]) < 1e-5


def test_two_nodes_resume_exactly(env, straight):
    whole, _ = straight
    first, _ = two_nodes(env, *env["base"], "train.num_nodes=2", "train.devices=1", "train.max_steps=2")
    resumed, _ = two_nodes(env, "--resume", first["run_id"], f"train.checkpoint_dir={env['root'] / 'ckpt'}",
                           "train.max_steps=3")
    assert resumed["run_id"] == first["run_id"]  # the same MLflow run continues
    client = env["client"]

    def history(run_id):
        return {m.step: m.value for m in sorted(client.get_metric_history(run_id, "train/loss"),
                                                 key=lambda m: m.timestamp)}

    assert history(first["run_id"]) == history(whole["run_id"]) and len(history(whole["run_id"])) == 3
    (w_params, w_state), (r_params, r_state) = saved(whole), saved(resumed)
    assert all(torch.equal(w_params[k], r_params[k]) for k in w_params)
    assert all(torch.equal(w_state[k], r_state[k]) for k in w_state)
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
