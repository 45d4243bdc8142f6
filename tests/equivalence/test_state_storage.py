"""Knobs on the state carried between steps (docs/knobs.md#state-storage-dtype, docs/knobs.md#rank-k-state-compression): its storage dtype (`model.state_dtype`) and its
rank-k compression at the segment boundary (`model.svd_state`).

Smoke scale: W = 8, D = 16 per head, S = 8 states of d = 32; XL:8 has N = W, Rec:fixed:skip N = 8W.
"""

import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.model.lm import build_model
from lrexp.model.state import KNNMemory, ModelState, RecurrentState, StateError, XLCache
from lrexp.model.svd_state import compress, truncate

from smoke import run_stream

V = 64
ROWS = ["xl512", "rec_fixed_skip"]


def _model(row, *overrides):
    cfg = load(overrides=["scale=smoke", f"row={row}", *overrides])
    torch.manual_seed(0)
    return build_model(cfg, V).eval(), cfg


def _tokens(lanes, length, seed=1):
    return torch.randint(0, V, (lanes, length), generator=torch.Generator().manual_seed(seed))


def _stream(model, cfg, segments=3, state=None):
    """Logits [2, segments*N, V] and the final state of a stream that carries state over segment boundaries."""
    n = cfg.derived.segment_len
    with torch.no_grad():
        return run_stream(model, _tokens(2, segments * n), n, state)


# ---- model.state_dtype (docs/knobs.md#state-storage-dtype) ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_float32_storage_is_the_unconverted_state_bitwise(row, monkeypatch):
    """docs/knobs.md#state-storage-dtype identity 1: storing in fp32 (the default) gives the logits and state of a model that never casts."""
    model, cfg = _model(row, "model.state_dtype=float32")
    logits, state = _stream(model, cfg)
    monkeypatch.setattr(ModelState, "cast", lambda self, dtype: self)
    monkeypatch.setattr(ModelState, "store", lambda self, dtype: self)
    plain_logits, plain_state = _stream(model, cfg)
    assert torch.equal(logits, plain_logits)
    for name, value in plain_state.to_tensors().items():
        assert torch.equal(state.to_tensors()[name], value)


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_storage_is_fp32_compute_on_the_rounded_state(row, dtype):
    """The stored state has the configured dtype and the fp32 shapes, and the next segment is computed in
    fp32 from it: the same logits, bitwise, as the fp32 model fed the rounded state upcast."""
    half, cfg = _model(row, f"model.state_dtype={dtype}")
    full, _ = _model(row)
    full.load_state_dict(half.state_dict())
    _, state = _stream(half, cfg, segments=2)
    want = full.initial_state(2, "cpu")
    for s, w in zip(state.layers, want.layers):
        for name, value in s.to_tensors().items():
            ref = w.to_tensors()[name]
            assert value.shape == ref.shape
            assert value.dtype == (getattr(torch, dtype) if ref.is_floating_point() else ref.dtype)
    assert half.initial_state(2, "cpu").layers[0].k.dtype == getattr(torch, dtype)
    assert state.carried_bytes() * 2 == want.carried_bytes()  # exactly halved
    n = cfg.derived.segment_len
    tokens = _tokens(2, n, seed=7)
    with torch.no_grad():
        a, _ = half(tokens, state)
        b, _ = full(tokens, state.cast(torch.float32))
        c, _ = full(tokens, _stream(full, cfg, segments=2)[1])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the rounding is real: fp32 storage predicts otherwise


def test_the_knn_memory_keeps_its_own_dtype():
    """model.state_dtype covers the memory layer's local cache; the memory itself has model.knn.state_dtype."""
    model, cfg = _model("mem64k", "model.state_dtype=bfloat16", "model.knn.state_dtype=float16")
    _, state = _stream(model, cfg, segments=2)
    (memory,) = [s for s in state.layers if isinstance(s, KNNMemory)]
    assert (memory.k.dtype, memory.memory_k.dtype, memory.pointer.dtype) == (torch.bfloat16, torch.float16, torch.int64)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_round_trip_error_is_bounded_per_element(dtype, bound):
    """docs/knobs.md#state-storage-dtype identity 2: |x - upcast(store(x))| <= 2^-8 |x| (bf16), 2^-11 |x| (fp16) in the normal range."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(3, 4, 16, 32, generator=g)
    x = r.sign() * (r.abs() + 0.5) * torch.logspace(-3, 4, 32)  # magnitudes 5e-4 .. 5e4: fp16's normal range
    c = torch.randn(3, 8, 32, generator=g)
    state = ModelState(layers=(RecurrentState(fresh=torch.zeros(3, dtype=torch.bool), k=x, v=-x, c=c),),
                       batch_size=3)
    back = state.store(dtype).cast(torch.float32).layers[0]
    for stored, original in ((back.k, x), (back.v, -x), (back.c, c)):
        assert stored.dtype == torch.float32
        assert ((stored - original).abs() <= bound * original.abs()).all()
    assert not torch.equal(back.k, x)


def test_a_float16_overflow_fails_at_the_store_naming_the_layer():
    k = torch.zeros(1, 1, 2, 2)
    k[0, 0, 1, 0] = 1e5  # above float16's 65504
    state = ModelState(layers=(None, XLCache(fresh=torch.zeros(1, dtype=torch.bool), k=k, v=k.clone())), batch_size=1)
    with pytest.raises(StateError, match="layer 1's carried xl state 'k' is not finite in torch.float16"):
        state.store(torch.float16)
    assert state.store(torch.bfloat16).layers[1].k[0, 0, 1, 0] == 1e5  # bfloat16 has fp32's range


# ---- model.svd_state (docs/knobs.md#rank-k-state-compression) -----------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_svd_off_or_without_targets_is_the_baseline_bitwise(row):
    """docs/knobs.md#rank-k-state-compression identity 1: off by default; a compression that targets nothing leaves the logits bit for bit."""
    model, cfg = _model(row)
    assert cfg.model.svd_state.rank is None and model.svd_state is None
    off, _ = _stream(model, cfg)
    untargeted, _ = _model(row, "model.svd_state.rank=1", "model.svd_state.targets=[]")
    assert torch.equal(_stream(untargeted, cfg)[0], off)


@pytest.mark.parametrize("row", ROWS)
@pytest.mark.parametrize("method", ["exact", "lowrank"])
def test_full_rank_is_a_no_op_within_1e_5(row, method):
    """docs/knobs.md#rank-k-state-compression identity 2: k >= min(n, m) reconstructs every carried matrix (relative error <= 1e-5) and leaves
    the logits of the following segments unchanged within tolerance; rank 1 does change them."""
    model, cfg = _model(row)
    logits, state = _stream(model, cfg)
    full, _ = _model(row, "model.svd_state.rank=64", f"model.svd_state.method={method}")
    full_logits, full_state = _stream(full, cfg)
    for name, value in state.to_tensors().items():
        if value.is_floating_point():
            err = (full_state.to_tensors()[name] - value).norm() / value.norm()
            assert err <= 1e-5, name
    torch.testing.assert_close(full_logits, logits, rtol=1e-5, atol=1e-5)
    assert full_state.stats and all(key.startswith("svd/") for key in full_state.stats)
    for key, value in full_state.stats.items():
        assert abs(float(value) - (1.0 if key.endswith("energy") else 0.0)) <= 1e-5, key
    low, _ = _model(row, "model.svd_state.rank=1", f"model.svd_state.method={method}")
    assert (_stream(low, cfg)[0] - logits).abs().amax() > 1e-3


def test_memory_slots_are_a_target_of_their_own():
    """`slots` compresses the memory slots M [n, d] per lane alone: full rank is a no-op within 1e-5, rank 1
    changes the slots (their energy logged) and the logits, and leaves the layer's XL cache as it was."""
    slots = ("model.slots.enabled=true", "model.slots.layers=[-1]", "model.slots.n=8")
    model, cfg = _model("xl512", *slots)
    logits, state = _stream(model, cfg)
    full, _ = _model("xl512", *slots, "model.svd_state.rank=8", "model.svd_state.targets=[slots]")
    full_logits, full_state = _stream(full, cfg)
    torch.testing.assert_close(full_logits, logits, rtol=1e-5, atol=1e-5)
    assert set(full_state.stats) == {"svd/slots_energy", "svd/slots_rel_error"}
    low, _ = _model("xl512", *slots, "model.svd_state.rank=1", "model.svd_state.targets=[slots]")
    low_logits, low_state = _stream(low, cfg)
    assert float(low_state.stats["svd/slots_energy"]) < 1 - 1e-5  # M is near rank 1 (its learned start) at smoke
    assert (low_logits - logits).abs().amax() > 1e-4
    ours, theirs = low_state.to_tensors(), state.to_tensors()
    changed = {name for name in theirs if not torch.equal(ours[name], theirs[name])}
    assert changed and all(name.endswith(".slots.c") for name in changed), changed


def test_rank_k_is_the_best_rank_k_and_its_energy():
    """X_k has rank k, E_k = sum of the k largest s_i^2 over all, and |X - X_k|_F^2 = the rest (Eckart-Young)."""
    x = torch.randn(5, 12, 20, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(x)  # [5, 12]
    x_k, energy = truncate(x, 4, "exact")
    assert (torch.linalg.matrix_rank(x_k) == 4).all()
    torch.testing.assert_close(energy, s[:, :4].square().sum(-1) / s.square().sum(-1))
    torch.testing.assert_close((x - x_k).square().sum((-2, -1)), s[:, 4:].square().sum(-1), rtol=1e-4, atol=1e-4)


def test_lowrank_energy_matches_exact_within_1e_3():
    """docs/knobs.md#rank-k-state-compression identity 3, on random rank-8 matrices plus 1% noise, compressed to rank 8 and 12."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, 8, generator=g) @ torch.randn(6, 8, 48, generator=g)  # [6, 64, 48], rank 8
    x = x + 0.01 * x.std() * torch.randn(x.shape, generator=g)
    for rank in (8, 12):
        _, exact = truncate(x, rank, "exact")
        _, low = truncate(x, rank, "lowrank")
        assert (low - exact).abs().max() <= 1e-3


def test_lowrank_leaves_the_global_generator_alone():
    """Its random start is a fixed seed in a forked generator: dropout draws and resumes stay exact."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    a, _ = truncate(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), 4, "lowrank")
    assert torch.equal(torch.rand(4), expected)
    b, _ = truncate(torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1)), 4, "lowrank")
    assert torch.equal(a, b)


@pytest.mark.parametrize("renormalize", [True, False])
def test_reconstructed_keys_get_their_norms_back_and_empty_slots_stay_empty(renormalize):
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(2, 2, 8, 16, generator=g), dim=-1)  # [B, H, W, D]
    k[0, :, :3] = 0.0  # a cache slot that a reset left empty
    cache = XLCache(fresh=torch.zeros(2, dtype=torch.bool), k=k, v=torch.randn(2, 2, 8, 16, generator=g))
    cfg = load(overrides=["scale=smoke", "model.svd_state.rank=2",
                          f"model.svd_state.renormalize_keys={renormalize}"]).model.svd_state
    out, stats = compress(ModelState(layers=(cache,), batch_size=2), cfg)
    norms = out.layers[0].k.norm(dim=-1)  # [B, H, W]
    if renormalize:
        torch.testing.assert_close(norms, k.norm(dim=-1))
        assert not out.layers[0].k[0, :, :3].any()
    else:
        assert (norms[1] < 0.999).any() and out.layers[0].k[0, :, :3].any()  # rounding noise where it was empty
    assert set(stats) == {"xl_cache_energy", "xl_cache_rel_error"} and 0 < float(stats["xl_cache_energy"]) < 1


def test_bad_svd_targets_fail_in_one_line():
    with pytest.raises(ConfigError, match="'model.svd_state.targets' must be distinct names of"):
        load(overrides=["scale=smoke", "model.svd_state.targets=[kv_cache]"])
    with pytest.raises(ConfigError, match="'model.svd_state.rank' must be > 0"):
        load(overrides=["scale=smoke", "model.svd_state.rank=0"])
