"""The fused Pallas kernel for a prompt chunk's attention over the cache: run through Pallas's interpreter on a CPU
against the fp32 einsum reference, routed by the Ops seam only where it serves, lowered for a GPU to a Triton call,
and through a bf16 chunked prefill against the portable blockwise loop."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.config import ConfigError, LlamaConfig
from llama_jax.generation import Generator
from llama_jax.inference import engine
from llama_jax.kernels import attention as attn
from llama_jax.kernels import chunk_attention, select_ops
from llama_jax.model import init_cache, init_params, unstack_layers


def _case(rng, b, t, h, g, s, d, filled, pads):
    """bf16 q [b, t, h, d] and a heads-first cache [b, g, s, d] whose rows are left-padded by `pads` and filled to
    `filled` slots (later ones empty, -1); the queries are the last t filled slots."""
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((b, g, s, d)), jnp.bfloat16) for _ in range(2))
    kv_positions = np.full((b, s), -1, np.int32)
    for row, pad in enumerate(pads):
        kv_positions[row, pad:filled] = np.arange(filled - pad)
    q_positions = kv_positions[:, filled - t:filled].copy()
    return q, k, v, jnp.asarray(q_positions), jnp.asarray(kv_positions)


def _reference(q, k, v, q_positions, kv_positions):
    """The einsum path in fp32 on the same bf16 values: whole score matrix, plain softmax."""
    mask = attn.position_mask(q_positions, kv_positions)
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    return np.asarray(attn.einsum_attention(*f32, mask, heads_first=True))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 64)])
@pytest.mark.parametrize("q_len,filled", [(5, 77), (40, 150), (71, 133)])
def test_kernel_equals_the_einsum_reference(heads, kv_heads, head_dim, q_len, filled):
    rng = np.random.default_rng(q_len)
    # 150 cache slots: not a multiple of the 16-key blocks, so the last block runs past the cache's end. Row 1's
    # padding covers the first queries of a short chunk (they see nothing and are not compared).
    pads = (0, 30, 3)
    q, k, v, qp, kp = _case(rng, 3, q_len, heads, kv_heads, 150, head_dim, filled, pads)
    run = jax.jit(functools.partial(chunk_attention.attention, block_q=16, block_k=16, interpret=True))
    out = run(q, k, v, qp, kp, jnp.int32(filled))
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    seen = np.asarray(qp) >= 0
    out = np.asarray(out.astype(jnp.float32))[seen]
    np.testing.assert_allclose(out, _reference(q, k, v, qp, kp)[seen], atol=1e-2)
    # The portable loop rounds at the same points, so the two differ by at most a unit in the last place.
    portable = attn.blockwise_attention(q, k, v, qp, kp, jnp.int32(filled), True, 16)
    np.testing.assert_allclose(out, np.asarray(portable.astype(jnp.float32))[seen], atol=4e-3)


def test_kernel_reads_no_slot_past_kv_len():
    rng = np.random.default_rng(5)
    q, k, v, qp, kp = _case(rng, 2, 20, 4, 2, 96, 32, 60, (0, 7))
    # Slots 64.. hold NaNs and valid-looking positions: read, they would poison every output.
    k, v = (a.at[:, :, 64:].set(jnp.nan) for a in (k, v))
    kp = kp.at[:, 64:].set(0)
    out = chunk_attention.attention(q, k, v, qp, kp, jnp.int32(60), block_q=16, block_k=32, interpret=True)
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)),
                               _reference(q, k[:, :, :64], v[:, :, :64], qp, kp[:, :64]), atol=2e-2)


def test_kernel_lowers_to_a_triton_call_for_a_gpu():
    q = jax.ShapeDtypeStruct((1, 512, 32, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 8, 4096, 128), jnp.bfloat16)
    qp, kp = jax.ShapeDtypeStruct((1, 512), jnp.int32), jax.ShapeDtypeStruct((1, 4096), jnp.int32)
    lowered = chunk_attention.attention.trace(q, k, k, qp, kp, jax.ShapeDtypeStruct((), jnp.int32)).lower(
        lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text().lower(), "the kernel did not lower to XLA's Triton call"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled Triton kernel needs a GPU (CI has none)")
def test_compiled_kernel_on_a_gpu_equals_the_einsum_reference():
    # The default 64 x 64 blocks, heads of 128 and GQA as the released Llamas, a ragged left-padded batch.
    rng = np.random.default_rng(11)
    q, k, v, qp, kp = _case(rng, 2, 512, 32, 8, 4200, 128, 3000, (0, 700))
    compiled = jax.jit(chunk_attention.attention).lower(q, k, v, qp, kp, jnp.int32(3000)).compile()
    assert "triton" in compiled.as_text().lower(), "the kernel did not compile to a Triton call"
    out = np.asarray(compiled(q, k, v, qp, kp, jnp.int32(3000)).astype(jnp.float32))
    np.testing.assert_allclose(out, _reference(q, k, v, qp, kp), atol=1e-2)


def _ops(chunk_kernel, block=8):
    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64)
    return dataclasses.replace(select_ops(config), attention_block=block, chunk_kernel=chunk_kernel)


def _takes_kernel(ops, q_len, dtype=jnp.bfloat16, layer=None, keys=40):
    q = jnp.ones((1, q_len, 4, 16), dtype)
    k = jnp.ones((1, 2, keys, 16), dtype) if layer is None else jnp.ones((3, 1, 2, keys, 16), dtype)
    fn = functools.partial(ops.attention, heads_first=True, kv_len=jnp.int32(keys), layer=layer,
                           q_positions=jnp.zeros((1, q_len), jnp.int32), kv_positions=jnp.zeros((1, keys), jnp.int32))
    return "pallas_call" in str(jax.make_jaxpr(fn)(q, k, k))


def test_ops_route_only_long_16_bit_prompt_chunks_to_the_kernel():
    ops = _ops("pallas_interpret")
    assert _takes_kernel(ops, 12)
    assert not _takes_kernel(ops, 12, keys=8)  # up to one block of keys: the einsum path, as ever
    assert not _takes_kernel(ops, 12, dtype=jnp.float32)  # fp32 stays exact on the portable path
    assert not _takes_kernel(ops, 1, keys=4096)  # a decode step
    assert not _takes_kernel(ops, 12, layer=1)  # the stacked cache keeps the in-place blockwise reads
    assert not _takes_kernel(_ops("blockwise"), 12)


def test_the_kernel_choice_is_checked(monkeypatch):
    config = LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=64)
    assert select_ops(config).chunk_kernel == "blockwise"
    monkeypatch.setenv("LLAMA_JAX_CHUNK_ATTENTION", "pallas_interpret")
    assert select_ops(config).chunk_kernel == "pallas_interpret"
    monkeypatch.setenv("LLAMA_JAX_CHUNK_ATTENTION", "flash")
    with pytest.raises(ConfigError, match="LLAMA_JAX_CHUNK_ATTENTION='flash'; expected one of"):
        select_ops(config)
    monkeypatch.setenv("LLAMA_JAX_CHUNK_ATTENTION", "pallas")
    with pytest.raises(ConfigError, match="compiles for a GPU"):
        select_ops(config, backend="cpu")
    assert select_ops(config, backend="gpu").chunk_kernel == "pallas"
    # On a mesh the cache is sharded, and a one-device kernel would gather it: the portable loop.
    assert select_ops(config, backend="gpu", mesh=types.SimpleNamespace(size=8)).chunk_kernel == "blockwise"


BF16 = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=256,
                   dtype="bfloat16", param_dtype="bfloat16", scan_layers=False)


def test_chunked_prefill_with_the_kernel_stays_near_the_portable_loop():
    params = unstack_layers(init_params(BF16.replace(scan_layers=True), jax.random.key(0)), BF16.n_layers)
    rng = np.random.default_rng(1)
    lengths, width = (60, 37, 9), 60
    tokens = np.zeros((3, width), np.int32)
    positions = np.full((3, width), -1, np.int32)
    for i, n in enumerate(lengths):
        tokens[i, width - n:] = rng.integers(0, BF16.vocab_size, n)
        positions[i, width - n:] = np.arange(n)

    def logits(chunk_kernel):
        run = jax.jit(functools.partial(engine.prefill_logits, config=BF16, ops=_ops(chunk_kernel), chunk=16))
        out, cache = run(params, jnp.asarray(tokens), jnp.asarray(positions), init_cache(BF16, 3, 72))
        return np.asarray(out[:, 0].astype(jnp.float32)), cache

    (fused, fused_cache), (portable, portable_cache) = logits("pallas_interpret"), logits("blockwise")
    scale = np.abs(portable).max()
    assert np.abs(fused - portable).max() <= 2e-2 * scale
    # The last layer's keys depend on every earlier layer's attention output. Padding slots (position -1) hold
    # whatever a query that sees nothing computes, which no query ever reads.
    filled = np.asarray(portable_cache.positions) >= 0
    keys = [np.asarray(c.k[-1], np.float32).transpose(0, 2, 1, 3)[filled] for c in (fused_cache, portable_cache)]
    np.testing.assert_allclose(*keys, atol=5e-2)


def test_generator_takes_the_kernel_for_long_prompts(monkeypatch):
    traced = []
    kernel = chunk_attention.attention
    monkeypatch.setattr(chunk_attention, "attention", lambda *a, **kw: traced.append(a[0].shape) or kernel(*a, **kw))
    params = init_params(BF16, jax.random.key(0))
    prompts = [list(np.random.default_rng(3).integers(1, 128, n)) for n in (41, 23)]
    gen = Generator(params, BF16, prefill_chunk=16)
    gen.ops = _ops("pallas_interpret")
    result = gen.generate(prompts, max_new_tokens=4)
    assert [len(t) for t in result.tokens] == [4, 4]
    # Both layers, in the chunk loop's body and in the tail's forward; decode steps keep the einsum path.
    assert traced and all(shape[1] == 16 for shape in traced) and len(traced) == 2 * BF16.n_layers
