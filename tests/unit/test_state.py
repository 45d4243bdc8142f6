"""ModelState: reset_rows, detach, checkpoint tensors; never a module attribute (docs/models.md#xl-cache, docs/models.md#identity-tests)."""

import pytest
import torch
from torch import Tensor, nn

from lrexp.config.load import load
from lrexp.model.lm import build_model
from lrexp.model.state import KNNMemory, ModelState, StateError, XLCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(load(overrides=["scale=smoke", "row=slide12"]), 64).eval()


def _carried(model, b=3):
    tokens = torch.randint(0, 64, (b, 64), generator=torch.Generator().manual_seed(1))
    return model(tokens, model.initial_state(b, "cpu"))[1]


def test_initial_state_is_all_fresh_zero_caches(model):
    state = model.initial_state(3, "cpu")
    assert len(state.layers) == len(model.layers) and state.batch_size == 3
    for s in state.layers:
        assert isinstance(s, XLCache) and s.fresh.all()
        assert s.k.shape == (3, 2, 8, 16) and not s.k.any() and not s.v.any()


def test_reset_rows_zeroes_flagged_lanes_only(model):
    state = _carried(model)
    assert not state.layers[0].fresh.any() and state.layers[0].k.abs().sum() > 0
    reset = state.reset_rows(torch.tensor([False, True, False]))
    for old, new in zip(state.layers, reset.layers):
        assert new.fresh.tolist() == [False, True, False]
        assert not new.k[1].any() and not new.v[1].any()
        assert torch.equal(new.k[[0, 2]], old.k[[0, 2]]) and torch.equal(new.v[[0, 2]], old.v[[0, 2]])
    assert state.layers[0].k[1].abs().sum() > 0  # functional: the input state is untouched
    with pytest.raises(StateError, match="doc_start must be a bool tensor \\[3\\]"):
        state.reset_rows(torch.tensor([0, 1, 0]))


def test_state_is_never_a_buffer_or_module_attribute(model):
    state = _carried(model)
    assert list(model.buffers()) == []
    for module in model.modules():
        assert not any(isinstance(v, Tensor) and not isinstance(v, nn.Parameter) for v in vars(module).values())
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}  # weights only
    weights = {p.data_ptr() for p in model.parameters()}
    assert not weights & {t.data_ptr() for t in state.to_tensors().values()}


def test_detach_leaves_no_autograd_history(model):
    model.train()
    try:
        tokens = torch.randint(0, 64, (2, 64))
        state = model.initial_state(2, "cpu")
        grad_state = ModelState(
            layers=tuple(XLCache(fresh=s.fresh, k=s.k.requires_grad_(), v=s.k * 2) for s in state.layers),
            batch_size=2,
        )
        assert grad_state.layers[0].v.grad_fn is not None
        detached = grad_state.detach()
        assert all(not t.requires_grad for t in detached.to_tensors().values())
        _, carried = model(tokens, grad_state)
        assert all(t.grad_fn is None for t in carried.to_tensors().values())  # the cache is a constant
    finally:
        model.eval()


def test_checkpoint_tensors_round_trip(model):
    state = _carried(model).reset_rows(torch.tensor([True, False, False]))
    tensors = state.to_tensors()
    assert set(tensors) >= {"num_layers", "batch_size", "layers.0.xl.k", "layers.3.xl.fresh"}
    back = ModelState.from_tensors({k: v.clone() for k, v in tensors.items()})
    assert back.batch_size == 3 and len(back.layers) == 4
    for name, value in back.to_tensors().items():
        assert torch.equal(value, tensors[name])
    with pytest.raises(StateError, match="unexpected tensor 'layers.0.bogus.k'"):
        ModelState.from_tensors({**tensors, "layers.0.bogus.k": torch.zeros(1)})


def test_advance_keeps_the_last_window_clears_fresh_and_keeps_the_kind():
    cache = XLCache.empty(2, 1, 4, 3, "cpu")  # W = 4
    memory = KNNMemory.initial(cache, 8, torch.float32)
    k, v = torch.randn(2, 1, 10, 3), torch.randn(2, 1, 10, 3)  # a segment of 10 tokens
    pointer = torch.tensor([5, 1])
    after = memory.advance(k, v, pointer=pointer)
    assert type(after) is KNNMemory and not after.fresh.any()
    assert torch.equal(after.k, k[:, :, -4:]) and torch.equal(after.v, v[:, :, -4:])
    assert after.pointer is pointer and after.memory_k is memory.memory_k  # the others: given or kept
    assert memory.fresh.all()  # functional: the old state is untouched
