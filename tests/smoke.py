"""The smoke-scale models and tokens the model tests share (`from smoke import V, smoke_model`; pytest puts
tests/ on the path, pyproject.toml)."""

import torch

from lrexp.config.load import load
from lrexp.model.lm import build_model

V = 64  # the vocabulary of every smoke model


def smoke_model(row, *overrides, seed=0):
    """The row at `scale=smoke` with `key=value` overrides, initialised from `seed`, in eval mode; and its config."""
    cfg = load(overrides=["scale=smoke", f"row={row}", *overrides])
    torch.manual_seed(seed)
    return build_model(cfg, V).eval(), cfg


def random_tokens(lanes, length, seed=1):
    """Token ids [lanes, length] in [0, V), the same for a seed."""
    return torch.randint(0, V, (lanes, length), generator=torch.Generator().manual_seed(seed))


def run_stream(model, tokens, segment_len, state=None):
    """Logits [B, T, V] of a stream tokens [B, T] cut into segments of segment_len, the state carried from
    one to the next (fresh lanes when state is None): what training sees, in one call; and the last state."""
    state = model.initial_state(tokens.shape[0], tokens.device) if state is None else state
    out = []
    for segment in tokens.split(segment_len, dim=1):
        logits, state = model(segment, state)
        out.append(logits)
    return torch.cat(out, dim=1), state
