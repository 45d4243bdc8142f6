"""A checkpoint read for `lrexp eval`: its config with the evaluation's overrides (`EVAL_KEYS`) on top, and
its model in fp32 eval mode with the trained weights."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Sequence

from lrexp.config.errors import ConfigError
from lrexp.config.load import load as load_config
from lrexp.config.schema import PolicyConfig
from lrexp.cache.decode import check_model
from lrexp.errors import UserError
from lrexp.lit import checkpoint as ckpt_mod
from lrexp.model.lm import build_model
from lrexp.train.run import resume_config

# What `lrexp eval` lets a user change: the policies and their knobs, logging, and how data is loaded.
# Everything else is the checkpoint's (the weights, the tokenizer, the stream).
EVAL_KEYS = ("policy.", "log.", "data.num_workers", "train.threads")


class EvalError(UserError, ValueError):
    """A checkpoint or option `lrexp eval` cannot use; one line."""


def load(checkpoint: str, overrides: Sequence[str] = ()):
    """(config, model, checkpoint info): the checkpoint's config with `overrides` (EVAL_KEYS only) on top,
    and its model in fp32 eval mode with the trained weights (read weights_only)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(EVAL_KEYS):
            raise EvalError(f"'{key}' cannot be changed at evaluation (it is the checkpoint's); lrexp eval takes "
                            f"{', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in EVAL_KEYS)}")
    try:
        path = ckpt_mod.locate(checkpoint, load_config().train.checkpoint_dir)
    except ckpt_mod.CheckpointError:
        raise EvalError(f"no checkpoint '{checkpoint}': neither a checkpoint file, a run folder holding "
                        f"{ckpt_mod.LAST}, nor an MLflow run id with one under train.checkpoint_dir") from None
    # the policy section a checkpoint saved is the training's defaults of its day, never a choice: the
    # evaluation starts from today's (`auto` mode), the overrides on top
    defaults = [f"policy.{f.name}={json.dumps(getattr(PolicyConfig(), f.name))}" for f in fields(PolicyConfig)]
    try:
        cfg, path = resume_config(str(path), [], [*defaults, *overrides])  # the checkpoint's config, the overrides on top
    except ConfigError as exc:
        raise EvalError(str(exc)) from None
    info = ckpt_mod.read(path)
    model = build_model(cfg, info.vocab_size)
    if any(n != "full" for n in cfg.policy.names) or cfg.policy.context:
        check_model(model)  # before any weights or data are read: Rec, Feedback, Memorizing rows stop here
    weights = ckpt_mod.load(path, mmap=False)["state_dict"]
    model.load_state_dict({k[len("model."):]: v for k, v in weights.items() if k.startswith("model.")})
    return cfg, model.float().eval(), info
