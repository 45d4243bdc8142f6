"""Attention with the lrexp semantics (docs/models.md#shared-backbone): `reference` is plain torch, the oracle and the
`reference` backend; `op` is the fused Triton kernel (imported only by the `triton` backend, since it needs
the triton package); `kernel` holds its JIT functions. Both take `attend`'s backend arguments:
(q, k, v, mask: MaskSpec, bias: BiasSpec | None, scale [H] | None, dropout_p)."""
