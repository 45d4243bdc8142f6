"""The `flex` backend (torch's FlexAttention) equals the reference: every mask case of the kernel tests and every
paper row. This torch runs FlexAttention on the CPU forward only (eagerly, over the dense scores), so the CPU
tests compare outputs and logits; gradients are compared on a GPU (docs/design.md#attention-backends)."""

import pytest
import torch

from lrexp.attention import BackendError, MaskSpec, attend
from test_attention_kernel import CASES, _inputs, _run
from test_rows_on_triton import ROWS, _logits_and_grads, _models

pytestmark = pytest.mark.slow  # importing FlexAttention alone takes over 10 s on 2 loaded cores; each call ~1 s


def _case_inputs(t_q, t_mem, mask, dtype=torch.float32):
    t_k = t_q + t_mem if mask.causal else t_mem
    q, k, v, table, scale = _inputs(t_q, t_k, dtype, d=16)
    return q, k, v, (table if mask.causal else None), scale


@pytest.mark.parametrize("t_q,t_mem,mask", CASES)
def test_flex_forward_matches_the_reference_on_cpu(t_q, t_mem, mask):
    from lrexp.attention.bias import BiasSpec
    from test_attention_kernel import BUCKETS, MAX_DISTANCE

    q, k, v, table, scale = _case_inputs(t_q, t_mem, mask)
    bias = None if table is None else BiasSpec(table, BUCKETS, MAX_DISTANCE)
    out = attend(q, k, v, mask, bias=bias, scale=scale, backend="flex")
    ref = attend(q, k, v, mask, bias=bias, scale=scale, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_flex_refuses_dropout_and_a_cpu_backward_in_one_line():
    q, k, v, _, scale = _case_inputs(4, 4, MaskSpec())
    with pytest.raises(BackendError, match="no attention dropout") as err:
        attend(q, k, v, MaskSpec(), scale=scale, backend="flex", dropout_p=0.1)
    assert "\n" not in str(err.value)
    with pytest.raises(BackendError, match="no backward on the CPU"):
        attend(q.requires_grad_(), k, v, MaskSpec(), scale=scale, backend="flex")


@pytest.mark.parametrize("row", ROWS)
def test_row_on_flex_equals_reference_on_cpu(row):
    """Segment 2's logits after a reference segment 1, lane 0 reset (as the triton rows test), no gradients."""
    reference, flex, n = _models(row, (), backend="flex")
    tokens = torch.randint(0, 64, (2, 2 * n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = reference(tokens[:, :n], reference.initial_state(2, "cpu"))
        state = state.reset_rows(torch.tensor([True, False]))
        ref_logits, _ = reference(tokens[:, n:], state)
        logits, _ = flex(tokens[:, n:], state)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("t_q,t_mem,mask", CASES)
def test_flex_forward_and_gradients_match_the_reference_on_gpu(t_q, t_mem, mask):
    q, k, v, table, scale = (None if x is None else x.cuda() for x in _case_inputs(t_q, t_mem, mask))
    if mask.memory_valid is not None:
        from dataclasses import replace

        mask = replace(mask, memory_valid=mask.memory_valid.cuda())
    out, grads = _run("flex", q, k, v, mask, table, scale)
    ref, ref_grads = _run("reference", q, k, v, mask, table, scale)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("row", ROWS)
def test_row_on_flex_equals_reference_on_gpu(row):
    reference, flex, n = (m if isinstance(m, int) else m.cuda() for m in _models(row, (), backend="flex"))
    tokens = torch.randint(0, 64, (2, 2 * n), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        _, state = reference(tokens[:, :n], reference.initial_state(2, "cuda"))
    state = state.reset_rows(torch.tensor([True, False], device="cuda"))
    ref_logits, ref_grads = _logits_and_grads(reference, tokens[:, n:], state)
    logits, grads = _logits_and_grads(flex, tokens[:, n:], state)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
