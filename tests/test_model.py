"""Our forward pass against Hugging Face's LlamaForCausalLM (PyTorch, CPU, fp32) with the same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits as _hf
from hf_reference import random_meta_state
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward, init_cache, init_params, rope_frequencies

SMALL = dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, max_seq_len=64)

CASES = {
    "llama2-mha": LlamaConfig(**SMALL),
    "gqa": LlamaConfig(**{**SMALL, "n_kv_heads": 2}),
    "llama3-theta500k": LlamaConfig(**{**SMALL, "n_kv_heads": 2, "rope_theta": 500000.0, "multiple_of": 64}),
    "llama3.1-scaled-rope": LlamaConfig(**{**SMALL, "n_kv_heads": 1, "rope_theta": 500000.0, "use_scaled_rope": True,
                                           "rope_scaling": RopeScaling(factor=8.0), "max_seq_len": 131072}),
    "llama3.2-tied": LlamaConfig(**{**SMALL, "n_kv_heads": 2, "rope_theta": 500000.0, "use_scaled_rope": True,
                                    "rope_scaling": RopeScaling(factor=32.0), "tie_embeddings": True,
                                    "max_seq_len": 131072}),
    "ffn-multiplier": LlamaConfig(**{**SMALL, "n_heads": 8, "n_kv_heads": 4, "ffn_dim_multiplier": 1.3,
                                     "multiple_of": 48, "norm_eps": 1e-6}),
}
SEQ = 12
# Long-context positions make Llama 3.1's low-frequency scaling visible; short ones cover the usual case.
START_POSITION = {"llama3.1-scaled-rope": 30000, "llama3.2-tied": 3000}


def _setup(name: str, seed: int = 0):
    config = CASES[name]
    state = random_meta_state(config, seed)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (2, SEQ))
    positions = np.broadcast_to(np.arange(SEQ) + START_POSITION.get(name, 0), tokens.shape)
    return config, state, params, tokens, positions


def assert_logits_close(ours, reference, rel=1e-4):
    scale = np.abs(reference).max()
    err = np.abs(np.asarray(ours) - reference).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} exceeds {rel} x logit scale {scale:.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_sequence_matches_hf(name):
    config, state, params, tokens, positions = _setup(name)
    logits, cache = forward(params, jnp.asarray(tokens), jnp.asarray(positions), config=config)
    assert cache is None
    assert logits.dtype == jnp.float32 and logits.shape == (2, SEQ, config.vocab_size)
    assert_logits_close(logits, _hf(state, config, tokens, positions))


@pytest.mark.parametrize("name,seq", [("llama2-mha", 256), ("gqa", 192), ("llama3.2-tied", 128), ("gqa", 100)])
def test_plain_causal_sequence_matches_hf(name, seq):
    # Training's path: no positions, so the plain causal mask, which the einsum path computes in blocks of
    # query rows from 128 tokens on (4, 3 and 2 blocks here; 100 tokens: one block).
    config = CASES[name].replace(max_seq_len=max(CASES[name].max_seq_len, seq))
    state = random_meta_state(config, 0)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, seq))
    logits = forward(params, jnp.asarray(tokens), config=config)[0]
    assert_logits_close(logits, _hf(state, config, tokens, np.broadcast_to(np.arange(seq), tokens.shape)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_token_by_token_with_cache_matches_hf(name):
    config, state, params, tokens, positions = _setup(name, seed=1)
    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=config))
    cache = init_cache(config, batch=2, max_len=SEQ + 4)
    # A 3-token prefill, then one token at a time: both cache paths are exercised.
    logits, cache = step(params, tokens[:, :3], positions[:, :3], cache)
    pieces = [logits]
    for t in range(3, SEQ):
        logits, cache = step(params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        pieces.append(logits)
    assert int(cache.index) == SEQ
    assert_logits_close(jnp.concatenate(pieces, axis=1), _hf(state, config, tokens, positions))


def test_left_padded_row_matches_unpadded_hf():
    config, state, params, tokens, positions = _setup("gqa", seed=2)
    pad = 5
    padded = np.concatenate([np.zeros((2, pad), np.int64), tokens], axis=1)
    padded_positions = np.concatenate([np.full((2, pad), -1), positions], axis=1)
    logits, _ = forward(params, jnp.asarray(padded), jnp.asarray(padded_positions), config=config)
    assert_logits_close(logits[:, pad:], _hf(state, config, tokens, positions))


def test_scaled_rope_case_is_sensitive_to_scaling():
    # Guards the scaled-rope comparison above against passing trivially: without scaling the logits must differ
    # by far more than the tolerance that comparison allows.
    config, state, params, tokens, positions = _setup("llama3.1-scaled-rope")
    unscaled = config.replace(use_scaled_rope=False)
    ours = forward(params, jnp.asarray(tokens), jnp.asarray(positions), config=unscaled)[0]
    reference = _hf(state, config, tokens, positions)
    assert np.abs(np.asarray(ours) - reference).max() > 10 * 1e-4 * np.abs(reference).max()


def test_rope_frequencies_match_hf_llama3_scaling():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from hf_reference import hf_config

    for factor in (8.0, 32.0):
        config = LlamaConfig(dim=1024, n_heads=8, rope_theta=500000.0, use_scaled_rope=True,
                             rope_scaling=RopeScaling(factor=factor))
        hf_freqs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config(config), "cpu")
        np.testing.assert_allclose(rope_frequencies(config), hf_freqs.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["gqa", "llama3.2-tied"])
def test_gradients_match_hf_autograd(name):
    """Our training gradients (with the custom weight-gradient products on CPU) against torch autograd through
    HF's model, taken with respect to the same Meta-format tensors (HF's q/k permutation is differentiated too)."""
    from hf_reference import hf_config, hf_state_from_meta
    from llama_jax.meta_weights import params_to_meta
    import torch
    import transformers

    config, state, params, tokens, _ = _setup(name, seed=3)
    leaves = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    model = transformers.LlamaForCausalLM(hf_config(config))
    logits = torch.func.functional_call(model, hf_state_from_meta(leaves, config),
                                        (torch.as_tensor(tokens, dtype=torch.long),), strict=False).logits
    hf_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), torch.as_tensor(tokens)[:, 1:].flatten())
    hf_loss.backward()

    def loss(p):
        out = forward(p, jnp.asarray(tokens), config=config)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out[:, :-1]), jnp.asarray(tokens)[:, 1:, None], -1))

    ours_loss, grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(ours_loss), float(hf_loss.detach()), rtol=1e-5)
    ours = params_to_meta(jax.tree.map(np.asarray, grads), config)
    assert leaves.keys() <= ours.keys()
    for key, tensor in leaves.items():
        reference = tensor.grad.numpy()
        err = np.abs(ours[key] - reference).max()
        assert err <= 1e-4 * np.abs(reference).max() + 1e-7, f"{key}: max abs diff {err:.3g}"


def test_cache_as_separate_layer_arrays_matches_hf():
    # The unrolled model keeps one cache array per layer (what generation uses); the scanned one a stacked array.
    config, state, params, tokens, positions = _setup("gqa", seed=4)
    config = config.replace(scan_layers=False)
    cache = init_cache(config, batch=2, max_len=SEQ)
    assert isinstance(cache.k, tuple) and len(cache.k) == config.n_layers
    logits, cache = forward(params, jnp.asarray(tokens[:, :5]), jnp.asarray(positions[:, :5]), cache, config=config)
    pieces = [logits]
    for t in range(5, SEQ):
        logits, cache = forward(params, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]), cache,
                                config=config)
        pieces.append(logits)
    assert_logits_close(jnp.concatenate(pieces, axis=1), _hf(state, config, tokens, positions))


def test_scanned_and_unrolled_layers_agree():
    config = CASES["gqa"].replace(n_layers=3)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)
    scanned = forward(params, tokens, positions, config=config)[0]
    unrolled = forward(params, tokens, positions, config=config.replace(scan_layers=False))[0]
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch", "dots_attention"])
def test_remat_policies_keep_loss_and_gradients(policy):
    config = CASES["gqa"]
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)

    def loss(p, cfg):
        logits = forward(p, tokens, positions, config=cfg)[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    reference = jax.value_and_grad(loss)(params, config)
    remat = jax.value_and_grad(loss)(params, config.replace(remat_policy=policy))
    # Recomputation may sum in another order: allow fp32 rounding relative to each gradient's own scale; a wrong
    # rematerialisation would be off by the gradient's whole size.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max())),
                 reference, remat)


def test_default_attention_impl_per_backend():
    from llama_jax.kernels import default_attention_impl

    assert default_attention_impl("gpu") == "dot_product_attention"
    assert default_attention_impl("cpu") == "einsum"


def test_dot_product_attention_path_matches_einsum():
    config, state, params, tokens, positions = _setup("gqa")
    einsum = forward(params, jnp.asarray(tokens), jnp.asarray(positions), config=config)[0]
    fused = forward(params, jnp.asarray(tokens), jnp.asarray(positions),
                    config=config.replace(attention_impl="dot_product_attention"))[0]
    assert_logits_close(fused, np.asarray(einsum), rel=1e-5)


def _dot_precisions(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for sub in _inner_jaxprs(eqn):  # jit, scan, remat bodies
            found += _dot_precisions(sub)
    return found


def _inner_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else [value]:
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp32_compute_asks_for_full_fp32_matmuls(dtype):
    # On NVIDIA GPUs XLA's default fp32 matmul rounds inputs to TF32 (logits ~1e-3 off HF, seen on an H100);
    # fp32 must mean fp32 there, while bf16 keeps the fast default. CPUs have no TF32: check what is asked for.
    config = CASES["gqa"].replace(dtype=dtype)
    params = init_params(config, jax.random.key(0))
    closed = jax.make_jaxpr(lambda p, t: forward(p, t, config=config))(params, jnp.zeros((1, 4), jnp.int32))
    precisions = _dot_precisions(closed.jaxpr)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert len(precisions) >= 4 * config.n_layers
    if dtype == "float32":
        assert all(p == highest for p in precisions), precisions
    else:
        assert not any(p == highest for p in precisions), precisions


def test_bf16_training_gradient_products_stay_bf16():
    # Every matmul of the bf16 backward pass takes bf16 operands: an fp32 cotangent reaching the vocab-sized
    # output products made them fp32 matmuls on an H100 (1B training MFU 43% instead of 48%).
    config = CASES["gqa"].replace(dtype="bfloat16")
    params = init_params(config, jax.random.key(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    closed = jax.make_jaxpr(jax.grad(lambda p: jnp.mean(forward(p, tokens, config=config)[0])))(params)
    operand_dtypes = _dot_operand_dtypes(closed.jaxpr)
    assert len(operand_dtypes) >= 3 * 4 * config.n_layers  # forward, and two products per matmul backward
    assert all(d == jnp.bfloat16 for pair in operand_dtypes for d in pair), operand_dtypes


def _dot_operand_dtypes(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(v.aval.dtype for v in eqn.invars))
        for sub in _inner_jaxprs(eqn):
            found += _dot_operand_dtypes(sub)
    return found


@pytest.mark.parametrize("impl", ["einsum", "dot_product_attention"])
def test_default_positions_are_the_plain_causal_case(impl):
    # positions=None (training's call) takes the mask-free causal path; it must be the same model.
    config, state, params, tokens, _ = _setup("gqa")
    logits, _ = forward(params, jnp.asarray(tokens), config=config.replace(attention_impl=impl))
    assert_logits_close(logits, _hf(state, config, tokens, np.broadcast_to(np.arange(SEQ), tokens.shape)))

    with pytest.raises(ValueError, match="positions are required with a cache"):
        forward(params, jnp.asarray(tokens), cache=init_cache(config, 2, SEQ), config=config)


# bf16 keeps 8 bits of mantissa; through two layers the logits stay within 3 % of their scale of the fp32 run.
BF16_TOLERANCE = 3e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a GPU (CI has none)")
def test_cudnn_fused_attention_on_gpu_matches_fp32_reference():
    # A GPU-sized head (128) and a sequence long enough for the flash kernel's tiling.
    config = LlamaConfig(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64,
                         max_seq_len=512, rope_theta=500000.0)
    state = random_meta_state(config, 0)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 256))
    reference = _hf(state, config, tokens, np.broadcast_to(np.arange(256), tokens.shape))
    fused = config.replace(dtype="bfloat16", attention_impl="dot_product_attention")
    run = jax.jit(lambda p, t: forward(p, t, config=fused)[0])
    hlo = run.lower(params, jnp.asarray(tokens)).compile().as_text()
    assert "cudnn" in hlo.lower(), "the fused path did not lower to cuDNN's attention kernel"
    assert_logits_close(run(params, jnp.asarray(tokens)), reference, rel=BF16_TOLERANCE)

    # Its gradient (training's backward pass) against the einsum path's, both in bf16.
    def loss(p, cfg):  # any scalar that depends on every logit will do
        logits = forward(p, jnp.asarray(tokens), config=cfg)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    g_fused = jax.grad(loss)(params, fused)
    g_einsum = jax.grad(loss)(params, fused.replace(attention_impl="einsum"))
    for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_einsum)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN fused attention needs a GPU (CI has none)")
def test_dots_attention_policy_saves_the_cudnn_forward_pass():
    import re

    config = LlamaConfig(dim=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64,
                         max_seq_len=512, dtype="bfloat16", attention_impl="dot_product_attention")
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, config.vocab_size)

    def grad_and_forward_kernels(policy):
        def loss(p):
            return jnp.mean(jax.nn.logsumexp(forward(p, tokens, config=config.replace(remat_policy=policy))[0], -1))

        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        kernels = re.findall(r'custom_call_target="(__cudnn\$fmha\w*)"', hlo)
        return jax.grad(loss)(params), [k for k in kernels if "Backward" not in k]

    g_saved, forwards_saved = grad_and_forward_kernels("dots_attention")
    g_recomputed, forwards_recomputed = grad_and_forward_kernels("dots_no_batch")
    # The scanned layer body holds one forward kernel; recomputation puts a second one in the backward loop.
    assert len(forwards_recomputed) == 2, forwards_recomputed
    assert len(forwards_saved) == 1, forwards_saved
    for a, b in zip(jax.tree.leaves(g_saved), jax.tree.leaves(g_recomputed)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_stays_near_fp32(param_dtype):
    config, state, params, tokens, positions = _setup("llama3-theta500k")
    fp32 = np.asarray(forward(params, jnp.asarray(tokens), jnp.asarray(positions), config=config)[0])
    bf16_config = config.replace(dtype="bfloat16", param_dtype=param_dtype)
    bf16_params = jax.tree.map(lambda p: p.astype(bf16_config.weight_dtype), params)
    bf16 = forward(bf16_params, jnp.asarray(tokens), jnp.asarray(positions), config=bf16_config)[0]
    assert bf16.dtype == jnp.float32  # logits come back fp32 whatever the compute dtype
    assert_logits_close(bf16, fp32, rel=BF16_TOLERANCE)
    # ...and bf16 really ran: the result is not bit-identical to fp32.
    assert np.abs(np.asarray(bf16) - fp32).max() > 0


def test_init_params_match_declared_logical_axes():
    from llama_jax.model import param_logical_axes

    config = CASES["ffn-multiplier"]
    params = init_params(config, jax.random.key(0))
    axes = param_logical_axes(config)
    jax.tree.map(lambda p, spec: None if p.ndim == len(spec) else pytest.fail(f"{p.shape} vs {spec}"), params, axes)
    assert sum(p.size for p in jax.tree.leaves(params)) == config.num_params()
