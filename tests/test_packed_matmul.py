"""llama_jax.kernels.packed_matmul, the CPU decoding kernel: its products against numpy in float64, its packed layout
against index arithmetic, decoding with packed weights against Hugging Face, and how the Generator picks it."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits, random_meta_state
from llama_jax.config import LlamaConfig
from llama_jax.generation import GenerationError, Generator
from llama_jax.kernels import PackedWeight, cpu_ffi, packed_matmul
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward, init_cache

ON_CPU = jax.default_backend() == "cpu"
HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_kernel = pytest.mark.skipif(not (ON_CPU and HAS_COMPILER),
                                  reason="the packed kernel needs JAX on a CPU and a C++ compiler to build it")


@needs_kernel
def test_kernel_builds_where_a_compiler_exists():
    assert packed_matmul.available()


@needs_kernel
@pytest.mark.parametrize("m,k,n", [
    (1, 64, 8),  # one row, one strip
    (3, 100, 24),  # a tail of rows, K not a multiple of anything
    (8, 768, 64),  # a decode step at batch 8
    (9, 33, 40),  # 8 rows + 1
    (100, 768, 16),  # several row blocks (40 rows each for K=768), the last one with a tail
    (17, 2048, 8),  # row blocks of 16 for K=2048
    (9, 4096, 1024),  # row blocks of 8 (the least) for K=4096, many strips per chunk, the thread pool
    (1, 4096, 4096),  # one row, 16M weights: every thread of the pool
    (3, 0, 16),  # an empty sum is zeros
    (16, 64, 24),  # prompt rows: strips in pairs, and an odd strip left over
    (23, 100, 40),  # pairs of strips over a tail of rows
    (40, 600, 24),  # pairs over panels of k (256, 256, 88) and a strip left over
    (300, 768, 2048),  # a prompt chunk of small-100m's MLP, on the thread pool
])
def test_matmul_matches_numpy(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    y = jax.jit(lambda x, w: packed_matmul.matmul(x, packed_matmul.pack(w).reshape(n // 8, k, 8)))(x, w)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    # The rounding bound of an fp32 sum of k products; a wrong row, column or k is off by O(1).
    bound = k * 2.0**-23 * (np.abs(x).astype(np.float64) @ np.abs(w))
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(y) - exact) <= bound)
    assert k == 0 or np.abs(exact).max() > 0  # not trivially passing with zeros


def test_pack_lays_each_strip_of_8_columns_out_contiguously():
    # Two stacked layers of a [3, 4] -> [16] weight (n_in=2, as wo's [heads, head_dim, dim]): K=12, N=16.
    w = np.arange(2 * 3 * 4 * 16, dtype=np.float32).reshape(2, 3, 4, 16)
    packed = np.asarray(packed_matmul.pack(jnp.asarray(w), n_in=2, n_lead=1))
    assert packed.shape == w.shape
    strips = packed.reshape(2, 2, 12, 8)  # [layer, strip, k, column in strip]
    for layer in range(2):
        matrix = w[layer].reshape(12, 16)
        for s in range(2):
            for k in range(12):
                np.testing.assert_array_equal(strips[layer, s, k], matrix[k, 8 * s:8 * s + 8])


def test_pack_and_matmul_reject_what_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="not a multiple of 8"):
        packed_matmul.pack(jnp.zeros((4, 12)))
    with pytest.raises(ValueError, match=r"expected float32 \[M, K\] and \[N/8, K, 8\]"):
        packed_matmul.matmul(jnp.zeros((2, 5)), jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="float32"):
        packed_matmul.matmul(jnp.zeros((2, 4), jnp.bfloat16), jnp.zeros((1, 4, 8), jnp.bfloat16))


SMALL = dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, multiple_of=32, max_seq_len=64)


@needs_kernel
@pytest.mark.parametrize("config", [LlamaConfig(**SMALL),
                                    LlamaConfig(**SMALL, n_kv_heads=2, rope_theta=500000.0, tie_embeddings=True)],
                         ids=["llama2-mha", "gqa-tied"])
def test_decoding_with_packed_weights_matches_hf(config):
    state = random_meta_state(config, seed=1)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
    gen = Generator(params, config)
    assert gen.packed_weights
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    positions = np.broadcast_to(np.arange(12), tokens.shape)

    step = jax.jit(lambda p, t, pos, c: forward(p, t, pos, c, config=gen.config))
    cache = init_cache(gen.config, 2, 16)
    assert packed_matmul.KERNEL.target in step.lower(gen.params, tokens[:, :8], positions[:, :8], cache).as_text()
    logits, cache = step(gen.params, tokens[:, :8], positions[:, :8], cache)  # prefill: 16 rows per product
    steps = [logits]
    for t in range(8, 12):  # decode: 2 rows per product
        logits, cache = step(gen.params, tokens[:, t:t + 1], positions[:, t:t + 1], cache)
        steps.append(logits)
    ours = np.concatenate([np.asarray(s) for s in steps], axis=1)
    reference = hf_logits(state, config, tokens, positions)
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


def _params(config, seed=0):
    return jax.tree.map(jnp.asarray, params_from_meta(
        {k: v.numpy() for k, v in random_meta_state(config, seed).items()}, config))


@needs_kernel
@pytest.mark.parametrize("case", ["scan-layers", "vocab-not-a-multiple-of-8"])
def test_packed_generator_gives_the_tokens_of_xla_dots(case):
    config = LlamaConfig(**{**SMALL, "n_kv_heads": 2, "vocab_size": 130 if case.startswith("vocab") else 128})
    params = _params(config)
    kw = dict(scan_layers=case == "scan-layers")
    packed, plain = Generator(params, config, **kw), Generator(params, config, packed_weights=False, **kw)
    assert packed.packed_weights
    head = packed.params["output"]
    # The layers are packed either way; a 130-wide head stays as it is.
    unpacked = not isinstance(head, PackedWeight) and np.array_equal(head, params["output"])
    assert unpacked == case.startswith("vocab")
    prompts = [[1, 5, 9, 77], [3]]
    assert packed.generate(prompts, max_new_tokens=6).tokens == plain.generate(prompts, max_new_tokens=6).tokens


def test_generator_packs_fp32_models_on_a_cpu_only():
    config = LlamaConfig(**SMALL)
    params = _params(config)
    assert Generator(params, config).packed_weights == (ON_CPU and HAS_COMPILER)
    assert not Generator(params, config, packed_weights=False).packed_weights
    bf16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    assert not Generator(bf16_params, bf16).packed_weights
    with pytest.raises(GenerationError, match="packed_weights=True, but the kernel is (fp32|for CPUs)"):
        Generator(bf16_params, bf16, packed_weights=True)
    alias = config.replace(dtype="fp32", param_dtype="fp32")  # DTYPES' other name for float32
    assert Generator(params, alias).packed_weights == (ON_CPU and HAS_COMPILER)
    if ON_CPU and HAS_COMPILER:
        with pytest.raises(GenerationError, match="already packed"):
            Generator(Generator(params, config).params, config)


def test_a_failed_build_says_which_compiler_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("LLAMA_JAX_CACHE_DIR", str(tmp_path))
    with pytest.raises(packed_matmul.PackedMatmulUnavailable, match="false failed to build packed_matmul.cc"):
        packed_matmul.KERNEL.build()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(packed_matmul.PackedMatmulUnavailable, match="no-such-compiler' not found"):
        packed_matmul.KERNEL.build()


def test_any_load_failure_is_one_reason_given_again_without_a_rebuild(tmp_path):
    kernel = cpu_ffi.CpuKernel("missing.cc", "llama_jax_missing", "Missing", switch="LLAMA_JAX_MISSING",
                               fallback="XLA's ops")  # a kernel of its own: the real ones stay registered
    with pytest.raises(cpu_ffi.KernelUnavailable, match="FileNotFoundError"):
        kernel.load()
    kernel.register = lambda: pytest.fail("load() tried again")
    with pytest.raises(cpu_ffi.KernelUnavailable, match="FileNotFoundError"):
        kernel.load()
    assert not kernel.available()


@pytest.mark.slow
def test_switched_off_by_environment_the_generator_keeps_xla_dots():
    code = ("from llama_jax.kernels import cpu_ffi, packed_matmul; from llama_jax.config import preset; "
            "from llama_jax.generation import Generator; from llama_jax.model import init_params; import jax; "
            "c = preset('tiny-llama2'); g = Generator(init_params(c, jax.random.key(0)), c); "
            "print(packed_matmul.available(), g.packed_weights, g.generate([[1, 2]], max_new_tokens=3).tokens)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         # JAX_PLATFORMS: the kernel's backend, and no second claim on a GPU's memory.
                         env={**os.environ, "LLAMA_JAX_PACKED_MATMUL": "0", "JAX_PLATFORMS": "cpu"})
    assert out.stdout.split()[:2] == ["False", "False"], out.stdout + out.stderr
