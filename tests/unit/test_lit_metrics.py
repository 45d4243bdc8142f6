"""Token-weighted metrics on hand-made batches (docs/models.md#metrics)."""

import math

import pytest
import torch
from mlflow.utils.validation import _validate_metric_name

from lrexp.config.errors import ConfigError
from lrexp.config.load import load
from lrexp.lit.metrics import TokenStats, bucket_names, token_nll


def hand_batch():
    # 2 lanes x 4 targets over a 3-token vocabulary; lane 1 is padded after 2 targets
    logits = torch.tensor([
        [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
        [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]],
    ])
    labels = torch.tensor([[0, 2, 2, 1], [1, 0, -1, -1]])  # padding labels out of range on purpose
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    target_bytes = torch.tensor([[1, 3, 2, 4], [2, 1, 0, 0]])
    doc_pos = torch.tensor([[62, 63, 64, 65], [1000, 1500, 0, 0]])
    return logits, labels, mask, target_bytes, doc_pos


def hand_nll(logits, labels, mask):
    total = []
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if mask[b, t]:
                z = logits[b, t]
                total.append(-(z[labels[b, t]] - torch.logsumexp(z, 0)).item())
    return total


def test_bits_per_byte_is_bits_per_token_times_tokens_over_bytes():
    logits, labels, mask, target_bytes, doc_pos = hand_batch()
    stats = TokenStats([64, 256, 1024])
    stats.update(token_nll(logits, labels, mask), mask, target_bytes, doc_pos)
    out = stats.compute()
    nlls = hand_nll(logits, labels, mask)
    tokens, n_bytes = 6, 1 + 3 + 2 + 4 + 2 + 1
    assert float(out["loss"]) == pytest.approx(sum(nlls) / tokens, rel=1e-6)
    assert float(out["bits_per_token"]) == pytest.approx(sum(nlls) / tokens / math.log(2), rel=1e-6)
    assert float(out["bits_per_byte"]) == pytest.approx(float(out["bits_per_token"]) * tokens / n_bytes, rel=1e-6)
    assert float(out["ppl"]) == pytest.approx(2 ** float(out["bits_per_token"]), rel=1e-6)


def test_position_buckets_are_the_scales_for_every_row():
    """docs/models.md#metrics: the paper's 0-4k / 4k-16k / 16k-64k / >64k at paper scale, scaled by the scale's window
    elsewhere, never by a row's N: XL:W (N = W) and Slide:13L (N = 8W) of one scale share them."""
    paper = [load(overrides=["scale=paper", f"row={r}"]).derived.position_buckets for r in ("xl512", "slide13")]
    assert paper == [[4096, 16384, 65536]] * 2
    for scale in ("smoke", "tiny", "small"):
        rows = {r: load(overrides=[f"scale={scale}", f"row={r}"]) for r in ("xl512", "xl2048", "slide13", "full")}
        assert len({tuple(c.derived.position_buckets) for c in rows.values()}) == 1, scale
        assert rows["xl512"].derived.segment_len != rows["slide13"].derived.segment_len
    custom = load(overrides=["scale=smoke", "log.position_buckets=[100,1000]"])
    assert custom.derived.position_buckets == [100, 1000]
    with pytest.raises(ConfigError, match="log.position_buckets"):
        load(overrides=["scale=smoke", "log.position_buckets=[100,50]"])


def test_loss_by_position_uses_log_spaced_buckets():
    assert bucket_names([64, 256, 1024]) == ["0-64", "64-256", "256-1024", "1024"]
    for name in bucket_names([64, 256, 1024]):  # a bad name would fail the run when it is first logged
        _validate_metric_name(f"val/bits_per_token_by_pos/{name}")
    logits, labels, mask, target_bytes, doc_pos = hand_batch()
    stats = TokenStats([64, 256, 1024])
    stats.update(token_nll(logits, labels, mask), mask, target_bytes, doc_pos)
    out = stats.compute()
    nlls = hand_nll(logits, labels, mask)  # positions 62, 63, 64, 65, 1000, 1500
    ln2 = math.log(2)
    assert float(out["bits_per_token_by_pos/0-64"]) == pytest.approx((nlls[0] + nlls[1]) / 2 / ln2, rel=1e-6)
    assert float(out["bits_per_token_by_pos/64-256"]) == pytest.approx((nlls[2] + nlls[3]) / 2 / ln2, rel=1e-6)
    assert float(out["bits_per_token_by_pos/256-1024"]) == pytest.approx(nlls[4] / ln2, rel=1e-6)
    assert float(out["bits_per_token_by_pos/1024"]) == pytest.approx(nlls[5] / ln2, rel=1e-6)


def test_batches_are_weighted_by_tokens_not_averaged():
    logits, labels, mask, target_bytes, doc_pos = hand_batch()
    stats = TokenStats([8])
    full = torch.ones_like(mask)
    labels = labels.clamp(min=0)
    stats.update(token_nll(logits, labels, full), full, target_bytes, doc_pos)  # 8 tokens
    one = torch.zeros_like(mask)
    one[0, 0] = True
    stats.update(token_nll(logits, labels, one), one, target_bytes, doc_pos)  # 1 token
    all_nll = hand_nll(logits, labels, full) + hand_nll(logits, labels, one)
    assert float(stats.compute()["loss"]) == pytest.approx(sum(all_nll) / 9, rel=1e-6)
    assert "bits_per_token_by_pos/0-8" in stats.compute()  # doc_pos 0 of the padded lane
    stats.reset()
    assert float(stats.tokens) == 0


def test_probe_answers_get_a_loss_of_their_own_and_text_corpora_none():
    logits, labels, mask, target_bytes, doc_pos = hand_batch()
    stats = TokenStats([64, 256, 1024])
    nll = token_nll(logits, labels, mask)
    stats.update(nll, mask, target_bytes, doc_pos)  # a text corpus: no answer flags
    assert "answer_bits_per_token" not in stats.compute()
    answer = torch.tensor([[False, True, False, True], [False, True, False, False]])
    stats.update(nll, mask, target_bytes, doc_pos, answer)
    nlls = hand_nll(logits, labels, mask)  # answers: targets 1 and 3 of lane 0, target 1 of lane 1
    out = stats.compute()
    assert float(out["answer_bits_per_token"]) == pytest.approx((nlls[1] + nlls[3] + nlls[5]) / 3 / math.log(2), rel=1e-6)
    assert float(out["loss"]) == pytest.approx(sum(nlls) / 6, rel=1e-6)  # the answers stay in the mean too
