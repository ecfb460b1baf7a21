"""The C++ CPU decode-attention kernel against the reference einsum attention with the position mask: per-row
lengths, padding slots inside the filled part, GQA and MHA, idle rows; and the kernels' seam routes decode steps
to it only where it applies."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import LlamaConfig
from llama_jax.kernels import attention as attn
from llama_jax.kernels import decode_attention, select_ops

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or not decode_attention.KERNEL.available(),
                                reason="the kernel is for CPUs and needs a C++ compiler")


def cache(rng, lengths, kv_heads, slots, head_dim, holes=()):
    """Random k, v and the positions of rows filled to `lengths` (slot j holds position j), with padding (-1) at
    the slots in `holes`, as a right-aligned prefill chunk leaves."""
    b = len(lengths)
    k, v = (jnp.asarray(rng.standard_normal((b, kv_heads, slots, head_dim)), jnp.float32) for _ in "kv")
    filled = np.arange(slots)[None] < np.asarray(lengths)[:, None]
    kv_positions = np.where(filled, np.arange(slots)[None], -1)
    kv_positions[:, list(holes)] = -1
    return k, v, jnp.asarray(kv_positions, jnp.int32)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 64), (6, 3, 12)])
def test_kernel_equals_the_einsum_reference_row_by_row(heads, kv_heads, head_dim):
    rng = np.random.default_rng(heads)
    lengths, slots = [1, 7, 40, 33, 64], 64
    k, v, kv_positions = cache(rng, lengths, kv_heads, slots, head_dim, holes=(2, 3))
    q = jnp.asarray(rng.standard_normal((len(lengths), 1, heads, head_dim)), jnp.float32)
    # Row 0 is idle (position -1): it sees nothing. The others query at their last slot, row 3 at an earlier
    # position than its cache holds (it must not see the later slots).
    q_positions = jnp.asarray([[-1], [6], [39], [20], [63]], jnp.int32)
    kv_len = jnp.asarray(lengths, jnp.int32)
    ours = jax.jit(decode_attention.attention)(q, k, v, q_positions, kv_positions, kv_len)
    reference = attn.einsum_attention(q, k, v, attn.position_mask(q_positions, kv_positions), heads_first=True)
    np.testing.assert_allclose(np.asarray(ours)[1:], np.asarray(reference)[1:], rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours)[0].any()  # the idle row: zeros, which nothing reads


def test_slots_past_a_rows_length_are_never_read():
    rng = np.random.default_rng(0)
    k, v, kv_positions = cache(rng, [10, 30], 2, 32, 16)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    q_positions, kv_len = jnp.asarray([[9], [29]], jnp.int32), jnp.asarray([10, 30], jnp.int32)
    before = decode_attention.attention(q, k, v, q_positions, kv_positions, kv_len)
    # NaNs past row 0's length (and a position that would be visible): the kernel must not touch them.
    poisoned = k.at[0, :, 10:].set(jnp.nan), v.at[0, :, 10:].set(jnp.nan)
    after = decode_attention.attention(q, *poisoned, q_positions, kv_positions.at[0, 10:].set(0), kv_len)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))


def test_a_shared_scalar_length_serves_every_row():
    rng = np.random.default_rng(1)
    k, v, kv_positions = cache(rng, [20, 20, 20], 2, 24, 16, holes=(0,))
    q = jnp.asarray(rng.standard_normal((3, 1, 4, 16)), jnp.float32)
    q_positions = jnp.asarray([[19], [12], [19]], jnp.int32)
    ours = decode_attention.attention(q, k, v, q_positions, kv_positions, jnp.int32(20))
    reference = attn.einsum_attention(q, k, v, attn.position_mask(q_positions, kv_positions), heads_first=True)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-6)


CONFIG = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)


def routed_to_kernel(ops, q_len=1, dtype=jnp.float32, layer=None):
    q, k = jnp.ones((2, q_len, 4, 16), jnp.float32), jnp.ones((2, 2, 32, 16), dtype)
    if layer is not None:
        k = k[None]
    fn = functools.partial(ops.attention, heads_first=True, kv_len=jnp.asarray([3, 9], jnp.int32), layer=layer,
                           q_positions=jnp.zeros((2, q_len), jnp.int32), kv_positions=jnp.zeros((2, 32), jnp.int32))
    return decode_attention.KERNEL.target in str(jax.make_jaxpr(fn)(q, k, k))


def test_the_seam_sends_only_fp32_one_device_decode_steps_to_the_kernel():
    ops = select_ops(CONFIG)
    assert ops.cache_kernel == "cpu_rows" and routed_to_kernel(ops)
    assert not routed_to_kernel(ops, q_len=4)  # a prefill chunk
    assert not routed_to_kernel(ops, dtype=jnp.bfloat16)  # a bf16 cache
    assert not routed_to_kernel(ops, layer=0)  # the stacked (scanned) layout
    assert not routed_to_kernel(dataclasses.replace(ops, cache_kernel="windows"))
    # On a mesh the cache is sharded: XLA's ops, which the partitioner splits, not a one-device kernel.
    if len(jax.devices()) >= 2:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("tensor",))
        assert select_ops(CONFIG, mesh=mesh).cache_kernel == "windows"
