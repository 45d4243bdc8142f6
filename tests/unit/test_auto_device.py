"""`train.precision: auto` and `model.attn.backend: auto` resolve by the run's device once, explicit values win
(docs/design.md#backends-and-precision); the CUDA branch with torch's device queries mocked."""

import pytest
import torch

from lrexp.attention import backends, resolve_backend
from lrexp.config.load import load
from lrexp.train.auto import resolve_auto


@pytest.fixture
def cuda(monkeypatch):
    """A CUDA device as torch's queries report it; bf16 support set by the test through the returned dict."""
    device = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: device["bf16"])
    return device


def _resolved(*overrides):
    cfg = resolve_auto(load(overrides=["scale=smoke", *overrides]))
    return cfg.train.precision, cfg.model.attn.backend


def test_auto_is_the_default_and_resolves_to_fp32_and_sdpa_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load(overrides=["scale=smoke"])
    assert (cfg.train.precision, cfg.model.attn.backend) == ("auto", "auto")
    assert _resolved() == ("32-true", "sdpa")
    assert resolve_backend("auto") == "sdpa"


def test_auto_on_cuda_is_bf16_mixed_and_triton(cuda):
    assert _resolved() == ("bf16-mixed", "triton")
    assert resolve_backend("auto") == "triton"


def test_a_cuda_device_without_bf16_trains_in_fp32(cuda):
    cuda["bf16"] = False
    assert _resolved() == ("32-true", "triton")


def test_cuda_without_triton_falls_to_sdpa(cuda, monkeypatch):
    monkeypatch.setattr(backends, "_importable", lambda package: package != "triton")
    assert _resolved() == ("bf16-mixed", "sdpa")


def test_a_cpu_accelerator_on_a_cuda_machine_resolves_for_the_cpu(cuda):
    assert _resolved("train.accelerator=cpu") == ("32-true", "sdpa")


def test_prefix_key_slots_take_sdpa_on_cuda(cuda):
    assert _resolved("model.slots.enabled=true", "model.slots.read=prefix_kv")[1] == "sdpa"


def test_explicit_values_win(cuda):
    assert _resolved("train.precision=16-mixed", "model.attn.backend=reference") == ("16-mixed", "reference")
