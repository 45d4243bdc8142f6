"""attend, its masks and backends, T5 buckets, and the blockwise sliding window (docs/models.md#shared-backbone, docs/models.md#identity-tests)."""

import pytest
import torch

from lrexp.attention import (
    BACKENDS, BackendError, BiasSpec, MaskSpec, RelativePositionBias, attend, l2_normalize, relative_bucket,
    resolve_backend, sliding_window_attention,
)
from lrexp.errors import UserError

# docs/models.md#t5-relative-position-bias: the first distance of every log bucket
BUCKET_STARTS = {16: 16, 19: 17, 21: 18, 24: 19, 27: 20, 31: 21, 35: 22, 40: 23, 46: 24, 52: 25, 59: 26,
                 67: 27, 77: 28, 87: 29, 99: 30, 113: 31}


def test_bucket_table_edges():
    n = torch.arange(0, 16)
    assert torch.equal(relative_bucket(n), n)
    for start, bucket in BUCKET_STARTS.items():
        assert relative_bucket(torch.tensor([start, start - 1])).tolist() == [bucket, bucket - 1]
    far = torch.tensor([127, 128, 129, 512, 10**6])
    assert relative_bucket(far).tolist() == [31] * 5
    assert relative_bucket(torch.tensor([-5])).tolist() == [0]  # unidirectional: n = max(i - j, 0)


def test_bias_is_bottom_right_aligned():
    rb = RelativePositionBias(num_heads=2)
    tile = rb().dense(4, 8)  # [H, W, 2W]
    # query i of the tile sits at key position W + i: the key just before it has distance 1
    for i in range(4):
        assert torch.equal(tile[:, i, 4 + i - 1], rb.table[:, 1])
        assert torch.equal(tile[:, i, 0], rb.table[:, 4 + i])


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (32, 64), (16, 100), (8, 5)])
def test_bias_by_distance_is_the_bucketed_table_at_every_distance(num_buckets, max_distance):
    """Backends index BiasSpec.by_distance() at min(n, max_distance): the same value as the bucket of n."""
    spec = BiasSpec(torch.randn(3, num_buckets), num_buckets, max_distance)
    dense = spec.dense(1, 4 * max_distance)[:, 0]  # [H, Tk]: the query sees keys at n = Tk - 1 .. 0
    n = torch.arange(4 * max_distance - 1, -1, -1)
    torch.testing.assert_close(dense, spec.table[:, relative_bucket(n, num_buckets, max_distance)], rtol=0, atol=0)


@pytest.mark.parametrize("include_self", [False, True])
def test_window_mask_sees_exactly_w_keys_at_the_right_distances(include_self):
    w, t, m = 5, 13, 5
    vis = MaskSpec(window=w, include_self=include_self).visible(t, m + t, torch.device("cpu"))[0]
    lo = 0 if include_self else 1
    for i in range(t):
        dist = sorted((m + i) - j for j in vis[i].nonzero().flatten().tolist())
        assert dist == list(range(lo, lo + w))


def _rand(b, h, tq, tk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = l2_normalize(torch.randn(b, h, tq, d, generator=g))
    k = l2_normalize(torch.randn(b, h, tk, d, generator=g))
    v = torch.randn(b, h, tk, d, generator=g)
    bias = BiasSpec(torch.randn(h, 32, generator=g), 32, 128)
    scale = torch.tensor([3.0, -2.0, 0.5])[:h]
    return q, k, v, bias, scale


def _empty_rows(b, tk):
    valid = torch.ones(b, tk, dtype=torch.bool)
    valid[0] = False  # lane 0: every key hidden
    return valid


@pytest.mark.parametrize("mask", [
    MaskSpec(window=4),
    MaskSpec(window=3, include_self=True),
    MaskSpec(),
    MaskSpec(causal=False),
    MaskSpec(window=4, memory_valid=torch.tensor([[False] * 4, [True, False, True, True]])),
])
def test_sdpa_matches_reference(mask):
    q, k, v, bias, scale = _rand(2, 3, 7, 11, 5)
    ref = attend(q, k, v, mask, bias=bias, scale=scale, backend="reference")
    out = attend(q, k, v, mask, bias=bias, scale=scale, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# flex has its own tests (tests/kernels/test_flex.py, slow tier): importing it takes seconds, no CPU backward
CPU_BACKENDS = [name for name in BACKENDS if name != "flex"]


def test_fully_masked_row_outputs_zero_and_sink_bounds_the_denominator():
    q, k, v, bias, scale = _rand(2, 3, 4, 4, 5)
    mask = MaskSpec(causal=False, memory_valid=_empty_rows(2, 4))
    for backend in CPU_BACKENDS:
        out = attend(q, k, v, mask, bias=bias, scale=scale, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert out[1].abs().sum() > 0
    # logits far below -1000: the sink term dominates and the output shrinks towards 0
    far_below = BiasSpec(torch.full((3, 32), -2000.0), 32, 128)
    tiny = attend(q, k, v, MaskSpec(causal=False), bias=far_below, scale=torch.ones(3), backend="reference")
    assert tiny.abs().max() < 1e-6
    torch.testing.assert_close(
        attend(q, k, v, MaskSpec(causal=False), bias=far_below, scale=torch.ones(3), backend="sdpa"),
        tiny, atol=1e-6, rtol=0)


def test_gradients_of_every_backend_match_the_reference():
    q, k, v, bias, scale = _rand(1, 2, 6, 9, 4)
    grads = {}
    for backend in CPU_BACKENDS:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias.table, scale)]
        out = attend(*leaves[:3], MaskSpec(window=3), bias=BiasSpec(leaves[3], 32, 128), scale=leaves[4],
                     backend=backend)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for backend in CPU_BACKENDS:
        for a, b in zip(grads[backend], grads["reference"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _dense_window(q, k, v, k_prev, v_prev, w, rb, scale, include_self, prev_valid, backend):
    """The oracle: one dense masked attention over [previous block; segment] (docs/models.md#identity-tests)."""
    memory_valid = None if prev_valid is None else prev_valid[:, None].expand(-1, w)
    return attend(q, torch.cat([k_prev, k], 2), torch.cat([v_prev, v], 2),
                  MaskSpec(window=w, include_self=include_self, memory_valid=memory_valid),
                  bias=rb(), scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
@pytest.mark.parametrize("w,blocks,include_self,masked", [
    (1, 5, False, False), (3, 1, False, False), (3, 5, True, False), (5, 3, False, True), (7, 2, True, True),
])
def test_blockwise_window_equals_dense_mask(backend, w, blocks, include_self, masked):
    b, h, d = 2, 3, 5
    t = w * blocks  # odd lengths: 5, 3, 15, 15, 14
    q, k, v, _, scale = _rand(b, h, t, t, d, seed=w)
    k_prev = l2_normalize(torch.randn(b, h, w, d))
    v_prev = torch.randn(b, h, w, d)
    rb = RelativePositionBias(h)
    prev_valid = torch.tensor([False, True]) if masked else None
    out = sliding_window_attention(q, k, v, k_prev, v_prev, window=w, bias=rb(), scale=scale,
                                   include_self=include_self, prev_valid=prev_valid, backend=backend)
    ref = _dense_window(q, k, v, k_prev, v_prev, w, rb, scale, include_self, prev_valid, "reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_unknown_backend_and_bad_shapes_raise_one_line_user_errors():
    with pytest.raises(UserError, match="available: .*reference.*sdpa"):
        resolve_backend("flash9")
    q, k, v, _, _ = _rand(1, 2, 4, 4, 3)
    with pytest.raises(BackendError, match="not a multiple of the window"):
        sliding_window_attention(q, k, v, k[:, :, :3], v[:, :, :3], window=3)
    with pytest.raises(UserError, match="at least as many keys"):
        attend(q, k[:, :, :2], v[:, :, :2], MaskSpec())


def test_cached_bias_indices_still_train_the_table():
    """`BiasSpec.dense` reads indices built once per shape: a second call shares them, and the gradient still
    reaches the table, bucket by bucket, as through indices built afresh."""
    rb = RelativePositionBias(num_heads=2, num_buckets=8, max_distance=12)
    weight = torch.randn(2, 6, 10)
    (rb().dense(6, 10) * weight).sum().backward()
    n = torch.arange(6)[:, None] + 4 - torch.arange(10)[None, :]  # [Tq, Tk] distances, bottom-right aligned
    expected = torch.zeros(2, 8).index_add_(1, relative_bucket(n, 8, 12).flatten(), weight.flatten(1))
    torch.testing.assert_close(rb.table.grad, expected)
    assert torch.equal(rb().dense(6, 10), rb().dense(6, 10))


def test_masks_of_one_shape_are_built_once_and_memory_valid_still_applies_after_the_prefix():
    a = MaskSpec(window=4).visible(4, 8, torch.device("cpu"))
    assert a is MaskSpec(window=4).visible(4, 8, "cpu")  # one tensor per shape, shared
    valid = torch.tensor([[True, False, True], [False, True, True]])
    vis = MaskSpec(causal=False, memory_valid=valid, prefix=2).visible(3, 7, "cpu")  # [B, Tq, P + M + 2]
    assert vis.shape == (2, 3, 7) and vis[:, :, :2].all() and vis[:, :, 5:].all()
    assert torch.equal(vis[:, 0, 2:5], valid)


def test_sdpa_dropout_path_on_a_cpu_is_bitwise_torchs():
    """The sdpa backend times its CPU dropout path itself (scaled_dot_product_attention's math path less the
    row search of its safe softmax): outputs and gradients equal torch's, bit for bit, under one seed."""
    import torch.nn.functional as F

    from lrexp.attention.backends import _sdpa_math

    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 4, 16, 8, requires_grad=True) for _ in range(3))
    add = torch.randn(1, 4, 16, 16)
    results = []
    for fn in (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=add, dropout_p=0.1, scale=1.0),
               lambda: _sdpa_math(q, k, v, add, 0.1)):
        torch.manual_seed(1)
        out = fn()
        results.append((out, *torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v))))
    assert all(torch.equal(a, b) for a, b in zip(*results))
