"""LongRangeLM: rows, parameter counts, causality, reset, backends, bad input (docs/models.md#rows, docs/models.md#shared-backbone, docs/models.md#identity-tests)."""

import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.attention import BACKENDS
from lrexp.errors import UserError
from lrexp.model.lm import build_model
from lrexp.model.state import StateError
from lrexp.model.variants import VARIANTS, row_name

from smoke import V, smoke_model as _model


def _tokens(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("row,name,layers,n", [
    ("xl512", "XL:8", 4, 8), ("xl1024", "XL:16", 4, 16), ("xl2048", "XL:32", 4, 32),
    ("slide12", "Slide:4L", 4, 64), ("slide13", "Slide:5L", 5, 64), ("full", "Full", 4, 64),
])
def test_rows_at_smoke_scale(row, name, layers, n):
    cfg = load(overrides=["scale=smoke", f"row={row}"])
    assert row_name(cfg) == name and cfg.model.num_layers == layers and cfg.derived.segment_len == n
    assert cfg.derived.lanes * n == cfg.data.tokens_per_step


@pytest.mark.parametrize("row,name,millions", [("slide12", "Slide:12L", 151.0), ("slide13", "Slide:13L", 163.6),
                                               ("xl2048", "XL:2048", 151.0)])
def test_paper_scale_parameter_counts(row, name, millions):
    cfg = load(overrides=["scale=paper", f"row={row}"])
    with torch.device("meta"):  # no memory allocated for 180M parameters
        model = build_model(cfg, 32128)
    embedding = model.embed.weight.numel()
    non_embedding = sum(p.numel() for p in model.parameters()) - embedding
    assert row_name(cfg) == name
    assert abs(non_embedding / (millions * 1e6) - 1) < 0.01
    assert abs(embedding / 32.9e6 - 1) < 0.01


@pytest.mark.parametrize("row", ["xl512", "slide12", "full"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causality(row, backend):
    model, cfg = _model(row, f"model.attn.backend={backend}")
    n = cfg.derived.segment_len
    tokens = _tokens(2, n)
    state = model(_tokens(2, n, seed=5), model.initial_state(2, "cpu"))[1]  # a carried cache, not zeros
    base, _ = model(tokens, state)
    for t in sorted({0, n // 2 - 1, n - 1}):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        out, _ = model(changed, state)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        if t < n - 1:
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().amax() > 1e-4  # later tokens do see it


@pytest.mark.parametrize("row", ["xl512", "slide12", "full"])
def test_sdpa_model_matches_reference(row):
    ref, cfg = _model(row, "model.attn.backend=reference")
    sdpa, _ = _model(row, "model.attn.backend=sdpa")
    sdpa.load_state_dict(ref.state_dict())
    assert (ref.backend, sdpa.backend) == ("reference", "sdpa")
    n = cfg.derived.segment_len
    s_ref, s_sdpa = ref.initial_state(2, "cpu"), sdpa.initial_state(2, "cpu")
    for seg in range(2):
        a, s_ref = ref(_tokens(2, n, seg), s_ref)
        b, s_sdpa = sdpa(_tokens(2, n, seg), s_sdpa)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("row", ["xl512", "slide12"])
@pytest.mark.parametrize("mask_empty", [False, True])
def test_reset_lane_is_bit_identical_to_fresh_and_others_untouched(row, mask_empty):
    model, cfg = _model(row, f"model.attn.mask_empty_cache={mask_empty}")
    n = cfg.derived.segment_len
    _, carried = model(_tokens(3, n, seed=1), model.initial_state(3, "cpu"))
    seg = _tokens(3, n, seed=2)
    reset = torch.tensor([False, True, False])
    out, _ = model(seg, carried.reset_rows(reset))
    fresh, _ = model(seg, model.initial_state(3, "cpu"))
    kept, _ = model(seg, carried)
    assert torch.equal(out[1], fresh[1])
    assert torch.equal(out[[0, 2]], kept[[0, 2]])
    assert not torch.equal(out[1], kept[1])  # the carried cache did matter for that lane


def test_reset_isolation_document_after_document():
    """docs/models.md#identity-tests: document B after document A in a lane (reset at B) == B alone in a fresh lane."""
    model, cfg = _model("slide12")
    n = cfg.derived.segment_len
    doc_a, doc_b = _tokens(1, 2 * n, seed=3), _tokens(1, 2 * n, seed=4)
    state = model.initial_state(1, "cpu")
    for seg in doc_a.split(n, dim=1):
        _, state = model(seg, state)
    state = state.reset_rows(torch.tensor([True]))
    alone = model.initial_state(1, "cpu")
    for seg in doc_b.split(n, dim=1):
        after_a, state = model(seg, state)
        fresh, alone = model(seg, alone)
        torch.testing.assert_close(after_a, fresh, atol=1e-6, rtol=0)


def test_mask_empty_cache_hides_the_slots_of_fresh_lanes():
    """With the knob, a fresh lane's cache content is invisible: garbage slots give the same logits as zeros."""
    model, cfg = _model("xl512", "model.attn.mask_empty_cache=true")
    seg = _tokens(2, cfg.derived.segment_len)
    _, garbage = model(_tokens(2, cfg.derived.segment_len, seed=9), model.initial_state(2, "cpu"))
    garbage = type(garbage)(layers=tuple(type(s)(fresh=torch.ones_like(s.fresh), k=s.k, v=s.v)
                                         for s in garbage.layers), batch_size=2)
    torch.testing.assert_close(model(seg, garbage)[0], model(seg, model.initial_state(2, "cpu"))[0],
                               atol=0, rtol=0)
    default, _ = _model("xl512")
    default.load_state_dict(model.state_dict())
    assert not torch.equal(default(seg, garbage)[0], default(seg, default.initial_state(2, "cpu"))[0])


def test_dropout_only_in_training():
    model, cfg = _model("slide12", "model.dropout=0.3")
    seg = _tokens(2, cfg.derived.segment_len)
    state = model.initial_state(2, "cpu")
    assert torch.equal(model(seg, state)[0], model(seg, state)[0])
    model.train()
    assert not torch.equal(model(seg, state)[0], model(seg, state)[0])


def test_bad_input_raises_one_line_user_errors():
    model, cfg = _model("xl512")
    n = cfg.derived.segment_len
    state = model.initial_state(2, "cpu")
    cases = [
        (lambda: model(_tokens(2, n).int(), state), "int64"),
        (lambda: model(torch.full((2, n), V), state), r"\[0, 64\)"),
        (lambda: model(torch.full((2, n), -1), state), r"\[0, 64\)"),
        (lambda: model(_tokens(2, n + 1), state), "multiple of the window 8"),
        (lambda: model(_tokens(3, n), state), "batch size 2"),
        (lambda: model(_tokens(2, n), _model("xl1024")[0].initial_state(2, "cpu")), "shapes"),
        (lambda: model(_tokens(2, n), _model("slide13")[0].initial_state(2, "cpu")), "5 layers"),
        (lambda: model(_tokens(2, n), _model("full")[0].initial_state(2, "cpu")), "carries XLCache"),
        (lambda: model(_tokens(2, n), None), "must be a ModelState"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as info:
            call()
        assert isinstance(info.value, (StateError, UserError)) and "\n" not in str(info.value)


@pytest.mark.parametrize("key,registry", [("model.variant", VARIANTS),
                                          ("model.attn.backend", {*BACKENDS, "auto"})])
def test_config_names_variant_and_backend_from_registries(key, registry):
    """The error lists exactly what is registered, so a new variant or backend needs no edit here."""
    with pytest.raises(ConfigError) as info:
        load(overrides=["scale=smoke", f"{key}=nonesuch"])
    assert str(info.value) == f"'{key}' is 'nonesuch'; allowed: {', '.join(sorted(registry))}"


@pytest.mark.parametrize("row,overrides", [
    ("xl512", ["model.svd_state.rank=2"]),  # the boundary compression's energy and error
    ("mem64k", []),  # the kNN memory's retrieval statistics
])
def test_a_forward_keeps_nothing_on_a_module_and_returns_what_it_measured(row, overrides):
    """What a segment measures comes back in the new state's `stats`; no module attribute changes (the model
    once kept the compression's statistics on itself between calls)."""
    model, cfg = _model(row, *overrides)
    n = cfg.derived.segment_len

    def attributes():
        return {(name, key): id(value) for name, m in model.named_modules() for key, value in vars(m).items()
                if not key.startswith("_")}

    before = attributes()
    state = model.initial_state(2, "cpu")
    with torch.no_grad():
        for seed in range(3):
            _, state = model(_tokens(2, n, seed=seed), state, measure=True)
    assert attributes() == before
    prefix = "svd/" if overrides else "knn"
    assert state.stats and all(key.startswith(prefix) for key in state.stats)


@pytest.mark.parametrize("shape", [(2, 5, 64), (3, 16, 48)])
def test_rms_norm_is_bitwise_its_formula_forward_and_backward(shape):
    """RMSNorm runs torch's fused kernel: LN(x) = gamma * x / sqrt(mean(x^2) + 1e-6), bit for bit, gradients too."""
    from lrexp.layers.common import RMSNorm

    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(*shape)
    formula = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * norm.weight
    fused = norm(x)
    assert torch.equal(fused, formula)
    grads = [torch.autograd.grad((y * g).sum(), (x, norm.weight)) for y in (fused, formula)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
