"""kNN retrieval, memory attention, the ring buffer, the KNNMemory state and the knn config (docs/models.md#memorizing-transformer, docs/models.md#identity-tests)."""

import pytest
import torch

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.attention.knn import (
    MASKED_SCORE, entry_age, gather, memory_attention, recall_at_k, ring_write, select,
)
from lrexp.layers.memorizing import COMBINE
from lrexp.model.lm import build_model
from lrexp.model.state import KNNMemory, ModelState, XLCache
from lrexp.model.variants import VariantError, row_name

B, H, D = 3, 2, 8


def _unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def _memory(size, count, seed=0):
    """Keys [B, H, size, D] with slots >= count zero (empty), as the ring leaves them."""
    keys = _unit(B, H, size, D, seed=seed)
    empty = torch.arange(size)[None, :] >= count[:, None]  # [B, size]
    return keys.masked_fill(empty[:, None, :, None], 0.0)


def _brute_scores(q, memory_k, count):
    s = torch.einsum("bhtd,bhjd->bhtj", q, memory_k)  # [B, H, T, K_mem]
    empty = torch.arange(memory_k.shape[2])[None, :] >= count[:, None]
    return s.masked_fill(empty[:, None, None, :], MASKED_SCORE)


def _sets(slots):
    return [set(row.tolist()) for row in slots.reshape(-1, slots.shape[-1])]


# ---- selection ----------------------------------------------------------------------------------------

def test_exact_equals_brute_force_top_k_and_never_picks_an_empty_slot():
    count = torch.tensor([64, 20, 37])
    memory_k, q = _memory(64, count), _unit(B, H, 5, D, seed=1)
    want = _brute_scores(q, memory_k, count).topk(6, dim=-1).indices
    got = select(q, memory_k, count, 6, "exact")
    assert _sets(got) == _sets(want)
    assert (got < count[:, None, None, None]).all()
    # chunked over the memory (here 3 slots at a time) so the scores stay bounded: the same neighbours
    assert _sets(select(q, memory_k, count, 6, "exact", max_scores=B * H * 5 * 3)) == _sets(want)


def test_bucket_takes_the_best_entry_of_each_strided_bucket():
    count = torch.tensor([64, 20, 37])
    memory_k, q = _memory(64, count, seed=2), _unit(B, H, 5, D, seed=3)
    k = 8
    s = _brute_scores(q, memory_k, count).unflatten(-1, (64 // k, k))  # [B, H, T, rows, k]: slot r*k + b
    want = s.argmax(dim=-2) * k + torch.arange(k)  # [B, H, T, k]
    assert torch.equal(select(q, memory_k, count, k, "bucket"), want)
    assert torch.equal(select(q, memory_k, count, k, "bucket", max_scores=B * H * 5 * k), want)  # row by row


def test_bucket_misses_a_second_best_entry_in_the_same_bucket_and_recall_says_so():
    # slots 0 and 2 share bucket 0 of k = 2; the query's two nearest keys are those two
    memory_k = torch.zeros(1, 1, 4, 2)
    memory_k[0, 0] = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.8, 0.6], [0.0, -1.0]])
    q, count = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([4])
    exact = select(q, memory_k, count, 2, "exact")
    bucket = select(q, memory_k, count, 2, "bucket")
    assert _sets(exact) == [{0, 2}] and _sets(bucket) == [{0, 3}]
    assert recall_at_k(bucket, exact, count).item() == pytest.approx(0.5)
    assert recall_at_k(exact, exact, count).item() == 1.0


def test_exact_and_bucket_agree_when_the_memory_is_full_and_holds_k_entries():
    count = torch.full((B,), 16)
    memory_k, q = _memory(16, count, seed=4), _unit(B, H, 7, D, seed=5)
    exact, bucket = select(q, memory_k, count, 16, "exact"), select(q, memory_k, count, 16, "bucket")
    assert _sets(exact) == _sets(bucket) == [set(range(16))] * (B * H * 7)
    assert recall_at_k(bucket, exact, count).item() == 1.0


def test_recall_counts_only_the_entries_a_partly_filled_memory_holds():
    count = torch.tensor([3, 0, 16])  # lane 0 holds fewer than k entries, lane 1 none (left out of the mean)
    memory_k, q = _memory(16, count, seed=6), _unit(B, H, 4, D, seed=7)
    exact, bucket = select(q, memory_k, count, 8, "exact"), select(q, memory_k, count, 8, "bucket")
    assert all({0, 1, 2} <= s for s in _sets(exact[0]))  # every entry of lane 0 is among its neighbours
    per_lane = [recall_at_k(bucket[i:i + 1], exact[i:i + 1], count[i:i + 1]).item() for i in (0, 2)]
    assert per_lane[0] == 1.0  # 3 entries in 3 different buckets of 8: all found
    assert recall_at_k(bucket, exact, count).item() == pytest.approx(sum(per_lane) / 2)
    assert recall_at_k(bucket[1:2], exact[1:2], count[1:2]).isnan()


# ---- memory attention and the ring ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_memory_attention_is_a_softmax_over_the_retrieved_items_with_the_live_query(backend):
    q = _unit(B, H, 5, D, seed=8).requires_grad_()
    keys, values = _unit(B, H, 5, 4, D, seed=9), torch.randn(B, H, 5, 4, D)
    scale = torch.tensor([1.5, -0.5])
    logits = (q[:, :, :, None, :] * keys).sum(-1) * scale[:, None, None]  # [B, H, T, k]
    want = (logits.softmax(-1)[..., None] * values).sum(-2)
    got = memory_attention(q, keys, values, scale, backend)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert q.grad.abs().sum() > 0  # the live query learns through the memory attention


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_an_empty_memory_gives_zero_output_and_finite_gradients(backend):
    count = torch.zeros(B, dtype=torch.int64)
    memory = torch.zeros(B, H, 16, D)
    q = _unit(B, H, 5, D, seed=10).requires_grad_()
    slots = select(q, memory, count, 4, "bucket")
    out = memory_attention(q, gather(memory, slots), gather(memory, slots), torch.ones(H), backend)
    out.sum().backward()
    assert not out.any() and torch.isfinite(q.grad).all()


def test_gather_returns_the_rows_at_the_slots():
    memory = torch.randn(B, H, 16, D)
    slots = torch.randint(0, 16, (B, H, 5, 3))
    got = gather(memory, slots)  # [B, H, T, k, D]
    assert torch.equal(got[2, 1, 4, 0], memory[2, 1, slots[2, 1, 4, 0]])
    assert got.shape == (B, H, 5, 3, D)


def test_the_ring_keeps_the_newest_entries_and_wraps_around():
    size, t = 8, 3
    memory = torch.zeros(1, 1, size, 1)
    pointer, count = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    mk, mv = memory, memory.clone()
    for step in range(4):  # tokens 0..11 into 8 slots: 8..11 overwrite the oldest, 0..3
        new = torch.arange(step * t, (step + 1) * t, dtype=torch.float32).reshape(1, 1, t, 1)
        mk, mv, pointer, count = ring_write(mk, mv, pointer, count, new, -new)
    assert mk.flatten().tolist() == [8, 9, 10, 11, 4, 5, 6, 7] and torch.equal(mv, -mk)
    assert not memory.any()  # functional: the input memory is untouched
    assert pointer.tolist() == [4] and count.tolist() == [8]
    # the newest entry is just behind the pointer: age 1; the oldest (slot 4, token 4) has age 8
    ages = entry_age(torch.arange(size).reshape(1, 1, 1, size), pointer, size).flatten().tolist()
    assert ages == [4, 3, 2, 1, 8, 7, 6, 5]
    # a segment longer than the memory leaves its newest `size` tokens, as if written one by one
    long = torch.arange(100, 111, dtype=torch.float32).reshape(1, 1, 11, 1)
    mk, _, pointer, count = ring_write(mk, mv, pointer, count, long, long)
    assert mk.flatten().tolist() == [104, 105, 106, 107, 108, 109, 110, 103]
    assert pointer.tolist() == [(4 + 11) % size] and count.tolist() == [8]  # the oldest, 103, at the pointer


def test_the_ring_writes_each_lane_at_its_own_pointer():
    mk = torch.zeros(2, 1, 4, 1)
    pointer, count = torch.tensor([0, 3]), torch.tensor([0, 3])
    new = torch.tensor([1.0, 2.0]).reshape(1, 1, 2, 1).expand(2, 1, 2, 1)
    mk, _, pointer, count = ring_write(mk, mk.clone(), pointer, count, new, new)
    assert mk[:, 0, :, 0].tolist() == [[1, 2, 0, 0], [2, 0, 0, 1]]
    assert pointer.tolist() == [2, 1] and count.tolist() == [2, 4]


def test_combine_modes():
    local = torch.randn(B, H, 5, D, requires_grad=True)
    mem = torch.randn(B, H, 5, D)
    torch.testing.assert_close(COMBINE["weighted_mean"](local, mem, torch.zeros(H)), (local + mem) / 2)  # g = 0.5
    assert torch.equal(COMBINE["weighted_mean"](local, mem, torch.full((H,), float("-inf"))), local)  # g = 0
    assert torch.equal(COMBINE["add"](local, mem, None), local + mem)
    out = COMBINE["stop_forward"](local, mem, None)
    out.sum().backward()
    assert torch.equal(out, mem) and torch.equal(local.grad, torch.ones_like(local))  # Y_mem out, Y_local learns


# ---- the state ----------------------------------------------------------------------------------------

def _state(lanes=3, size=16):
    cache = XLCache(fresh=torch.zeros(lanes, dtype=torch.bool), k=torch.randn(lanes, H, 4, D),
                    v=torch.randn(lanes, H, 4, D))
    s = KNNMemory.initial(cache, size, torch.bfloat16)
    return KNNMemory(fresh=s.fresh, k=s.k, v=s.v, memory_k=torch.randn_like(s.memory_k),
                     memory_v=torch.randn_like(s.memory_v), pointer=torch.tensor([3, 5, 7]),
                     count=torch.tensor([16, 5, 7]))


def test_initial_memory_is_empty_in_the_storage_dtype():
    cache = XLCache.empty(2, H, 4, D, "cpu")
    s = KNNMemory.initial(cache, 16, torch.bfloat16)
    assert s.memory_k.shape == (2, H, 16, D) and s.memory_k.dtype == torch.bfloat16
    assert not s.memory_k.any() and not s.memory_v.any() and s.pointer.tolist() == [0, 0]
    assert s.count.dtype == torch.int64 and s.fresh.all()


def test_reset_clears_exactly_one_lane():
    state = _state()
    reset = state.reset_rows(torch.tensor([False, True, False]))
    assert not reset.memory_k[1].any() and not reset.memory_v[1].any() and not reset.k[1].any()
    assert reset.pointer.tolist() == [3, 0, 7] and reset.count.tolist() == [16, 0, 7]
    assert reset.fresh.tolist() == [False, True, False]
    for name in ("memory_k", "memory_v", "k", "v"):
        assert torch.equal(getattr(reset, name)[[0, 2]], getattr(state, name)[[0, 2]])
    assert state.memory_k[1].any() and state.count[1] == 5  # functional: the input state is untouched


def test_model_state_round_trips_a_knn_memory():
    state = ModelState(layers=(None, _state()), batch_size=3)
    back = ModelState.from_tensors(state.to_tensors())
    assert isinstance(back.layers[1], KNNMemory) and back.layers[0] is None
    for name, t in state.layers[1].to_tensors().items():
        got = back.layers[1].to_tensors()[name]
        assert torch.equal(got, t) and got.dtype == t.dtype, name


# ---- config and variant -------------------------------------------------------------------------------

def test_the_row_resolves_at_every_scale():
    paper = load(overrides=["scale=paper", "row=mem64k"])
    assert paper.derived.knn_layers == [8] and paper.derived.recurrent_layers == []  # layer 9 of 12
    assert paper.model.knn.memory_size == 65536 and paper.model.knn.k == 128
    assert paper.derived.segment_len == paper.model.window == 512
    assert row_name(paper) == "Memorizing Trans. 64k"
    smoke = load(overrides=["scale=smoke", "row=mem64k"])
    assert smoke.derived.knn_layers == [0] and row_name(smoke) == "Memorizing Trans. 128"
    assert load(overrides=["scale=small", "row=mem64k"]).derived.knn_layers == [2]


@pytest.mark.parametrize("overrides,message", [
    (["model.knn.memory_size=100"], r"'model.knn.memory_size' \(100\) must be a multiple of the segment length \(8\)"),
    (["model.knn.k=256"], r"'model.knn.k' \(256\) must be <= 'model.knn.memory_size' \(128\)"),
    (["model.knn.k=24"], r"must be a multiple of 'model.knn.k' \(24\) for the bucket backend"),
    (["model.knn.layers=[4]"], r"'model.knn.layers' index 4 is outside a stack of 4 layers"),
    (["model.knn.layers=[0,-4]"], r"'model.knn.layers' names a layer twice"),
    (["model.recurrent.layers=[0]"], r"layer 0 is both a kNN memory layer"),
    (["model.knn.memory_size=0"], r"'model.knn.memory_size' must be > 0"),
    (["model.knn.backend=faiss"], r"model.knn.backend"),
])
def test_bad_knn_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load(overrides=["scale=smoke", "row=mem64k", *overrides])
    assert "\n" not in str(err.value)


def test_exact_needs_no_bucket_multiple_and_the_variant_needs_a_memory_layer():
    assert load(overrides=["scale=smoke", "row=mem64k", "model.knn.k=24", "model.knn.backend=exact"])
    cfg = load(overrides=["scale=smoke", "row=mem64k", "model.knn.layers=[]"])
    with pytest.raises(VariantError, match="needs a memory layer"):
        build_model(cfg, 16)
