"""train.threads: the CPU threads a run uses, resolved once and logged (the CLI sets no OMP_NUM_THREADS)."""

import pytest

from lrexp.config.errors import ConfigError
from lrexp.config.load import load

from lrexp.train import run as train


@pytest.mark.parametrize("overrides,env,cpus,want", [
    (["train.threads=3"], "1", 2, 3),  # given: taken as it is
    ([], "5", 2, 5),  # the environment's choice
    ([], None, 2, 1),  # the machine's CPUs but one
    ([], None, 9, 8),
    (["train.devices=2", "train.accelerator=cpu", "train.strategy=ddp"], None, 9, 4),  # shared by the ranks
    (["train.devices=4", "data.tokens_per_step=512"], None, 2, 1),
    ([], None, 1, 1),
])
def test_threads_resolve(monkeypatch, overrides, env, cpus, want):
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(train, "usable_cpus", lambda: cpus)
    assert train.cpu_threads(load(overrides=["scale=smoke", *overrides])) == want


def test_usable_cpus_is_the_affinity_mask_at_most():
    import os

    assert 1 <= train.usable_cpus() <= len(os.sched_getaffinity(0))


def test_threads_must_be_positive():
    with pytest.raises(ConfigError, match="'train.threads' must be > 0"):
        load(overrides=["scale=smoke", "train.threads=0"])
