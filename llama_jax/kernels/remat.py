"""Activation-checkpointing policies by name (LlamaConfig.remat_policy): what the backward pass keeps."""

from __future__ import annotations

import jax


def _save_dots_and_fused_attention(prim, *avals, **params) -> bool:
    """dots_no_batch, plus the output and softmax statistics of cuDNN's attention forward pass: a custom call,
    which no dots policy saves, so that kernel would otherwise run again in the backward pass. Elsewhere (the
    einsum path, a CPU) it is dots_no_batch. The primitive's name is JAX's own, not public API: a GPU test checks
    that the policy still keeps the kernel from running twice."""
    return (prim.name == "dot_product_attention_fwd_wrapper"
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "dots_attention": _save_dots_and_fused_attention,
}
