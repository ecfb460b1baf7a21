"""Long prompts in bounded memory: blockwise attention against the einsum reference, chunked prefill against a
one-shot prefill and Hugging Face, Llama 3.1's scaled RoPE far out, and prefill memory that stays flat."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits, random_meta_state
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.generation import GenerationError, Generator
from llama_jax.inference import engine
from llama_jax.kernels import attention as attn
from llama_jax.kernels import select_ops
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward, init_cache, init_params, unstack_layers

# Blocks of 8 keys and chunks of 8 tokens: a 30-token prompt crosses several of each.
BLOCK = 8
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=256)
CONFIG = LlamaConfig(**SMALL)
SCALED = LlamaConfig(**{**SMALL, "rope_theta": 500000.0, "use_scaled_rope": True,
                        "rope_scaling": RopeScaling(factor=8.0), "max_seq_len": 131072})


def _setup(config, seed=0):
    state = random_meta_state(config, seed)
    return state, jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))


def assert_logits_close(ours, reference, rel=1e-4):
    scale = np.abs(reference).max()
    err = np.abs(np.asarray(ours) - reference).max()
    assert err <= rel * scale, f"max abs diff {err:.3g} exceeds {rel} x logit scale {scale:.3g}"


# --- the kernel -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads_first", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("q_len,kv_len", [(1, 21), (5, 37), (20, 29), (37, None)])
@pytest.mark.parametrize("budget_queries", [0, 6])
def test_blockwise_attention_equals_einsum_reference(heads_first, heads, kv_heads, q_len, kv_len, budget_queries):
    # budget_queries 6: a scores budget of 6 queries per block, so 20 queries go in 4 blocks of 5 and 37 in 7 of 6
    # (five of them padding); 0: blocks of BLOCK queries.
    rng = np.random.default_rng(q_len)
    b, s, d = 3, 37, 8
    q = jnp.asarray(rng.standard_normal((b, q_len, heads, d)), jnp.float32)
    shape = (b, kv_heads, s, d) if heads_first else (b, s, kv_heads, d)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    filled = s if kv_len is None else kv_len
    # Row 0 left-padded by 4, row 1 by 11 (its first query rows see nothing), row 2 unpadded; empty slots -1.
    kv_positions = np.full((b, s), -1, np.int32)
    for row, pad in enumerate((4, 11, 0)):
        kv_positions[row, pad:filled] = np.arange(filled - pad)
    q_positions = kv_positions[:, filled - q_len:filled].copy()
    q_positions[2, 0] = 2  # a query that sees only an early prefix
    mask = attn.position_mask(jnp.asarray(q_positions), jnp.asarray(kv_positions))
    reference = attn.einsum_attention(q, k, v, mask, heads_first)
    run = jax.jit(attn.blockwise_attention, static_argnums=(6, 7), static_argnames="scores_budget")
    out = run(q, k, v, jnp.asarray(q_positions), jnp.asarray(kv_positions), kv_len, heads_first, BLOCK,
              scores_budget=4 * b * heads * BLOCK * budget_queries)
    seen = np.asarray(mask.any(-1))  # rows that see no key at all are padding: ignorable on both paths
    assert seen.sum() > q_len
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(reference)[seen], atol=2e-6)


@pytest.mark.parametrize("stacked", [False, True])
def test_blockwise_attention_reads_one_row_of_the_cache_in_place(stacked):
    """With `row`, a batch of one attends to that row of a 3-row cache: the same as the einsum reference on the
    row cut out (and a layer of a stacked cache, read in place too)."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 5, 6, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 3, 2, 37, 8)), jnp.float32) for _ in range(2))
    kv_positions = np.full((3, 37), -1, np.int32)
    kv_positions[:, :30] = np.arange(30)
    q_positions = kv_positions[1:2, 25:30]
    mask = attn.position_mask(jnp.asarray(q_positions), jnp.asarray(kv_positions[1:2]))
    reference = attn.einsum_attention(q, k[1, 1:2], v[1, 1:2], mask, heads_first=True)
    layer = 1 if stacked else None
    kk, vv = (k, v) if stacked else (k[1], v[1])
    out = jax.jit(attn.blockwise_attention, static_argnums=(6, 7))(
        q, kk, vv, jnp.asarray(q_positions), jnp.asarray(kv_positions[1:2]), 30, True, BLOCK, layer, jnp.int32(1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=2e-6)


@pytest.mark.parametrize("block", [BLOCK, 512])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_prompt_chunk_into_one_row_of_a_cache_equals_a_cache_of_its_own(block, scan_layers):
    """KVCache.row: a chunk written into row 1 of a 3-row cache (blockwise, or the einsum path where the cache is
    short) gives the logits of the same chunk in a one-row cache, stores the same keys, and leaves rows 0 and 2
    as they were."""
    config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    _, params = _setup(CONFIG)  # stacked layers
    if not scan_layers:
        params = unstack_layers(params, config.n_layers)
    ops = dataclasses.replace(select_ops(config), attention_block=block)
    run = jax.jit(functools.partial(forward, config=config, ops=ops))
    rng = np.random.default_rng(0)
    first, second = (jnp.asarray(rng.integers(3, 128, (1, n)), jnp.int32) for n in (12, 9))
    pos1, pos2 = jnp.arange(12, dtype=jnp.int32)[None], jnp.arange(12, 21, dtype=jnp.int32)[None]

    alone = init_cache(config, 1, 40)
    _, alone = run(params, first, pos1, alone)
    expected, alone = run(params, second, pos2, alone)

    full = init_cache(config, 3, 40, per_row_index=True)
    others = jax.tree.map(lambda a: a + 1 if a.dtype == jnp.float32 else a, full)
    view = others._replace(index=jnp.int32(0), row=jnp.int32(1))
    _, view = run(params, first, pos1, view)
    logits, view = run(params, second, pos2, view)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-5)
    assert int(view.index) == 21
    # Per layer (a tuple's arrays, or a stacked array's slices): [rows, kv_heads, slots, head_dim].
    for got, want, untouched in zip(view.k, alone.k, others.k):
        np.testing.assert_allclose(np.asarray(got)[1, :, :21], np.asarray(want)[0, :, :21], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(got)[[0, 2]], np.asarray(untouched)[[0, 2]])
    np.testing.assert_array_equal(np.asarray(view.positions)[1, :21], np.arange(21))
    assert (np.asarray(view.positions)[[0, 2]] == -1).all()


def test_blockwise_attention_in_bf16_stays_near_the_einsum_reference():
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((2, 12, 4, 16)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 40, 16)), jnp.bfloat16) for _ in range(2))
    positions = jnp.broadcast_to(jnp.arange(40, dtype=jnp.int32), (2, 40))
    mask = attn.position_mask(positions[:, 28:], positions)
    reference = attn.einsum_attention(q, k, v, mask, heads_first=True).astype(jnp.float32)
    out = attn.blockwise_attention(q, k, v, positions[:, 28:], positions, None, True, BLOCK)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(reference), atol=2e-2)


def _runs(ops, q_len, keys):
    """The primitives of `ops.attention` for q_len queries over a heads-first cache of `keys` slots, all filled."""
    q, k = jnp.ones((1, q_len, 4, 16)), jnp.ones((1, 2, keys, 16))
    fn = functools.partial(ops.attention, heads_first=True, kv_len=jnp.int32(keys),
                           q_positions=jnp.zeros((1, q_len), jnp.int32), kv_positions=jnp.zeros((1, keys), jnp.int32))
    return str(jax.make_jaxpr(fn)(q, k, k))


def test_ops_route_long_attention_blockwise():
    ops = select_ops(CONFIG)
    assert "while" in _runs(ops, 2, ops.attention_block + 1) and "while" not in _runs(ops, 2, ops.attention_block)
    # A decode step over a long cache too (with XLA's ops on a CPU, past the decode windows' range; the C++
    # decode kernel, where it serves, reads each row's filled part at any length).
    xla_ops = dataclasses.replace(ops, cache_kernel="windows")
    assert ops.windows_max_keys and "while" in _runs(xla_ops, 1, 2 * ops.windows_max_keys)
    assert "while" not in _runs(xla_ops, 1, ops.windows_max_keys)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_an_accelerator_reads_a_long_cache_through_windows_not_a_loop(backend):
    ops = select_ops(CONFIG, backend=backend)
    assert ops.cache_kernel == "windows" and ops.windows_max_keys == 0
    keys = 64 * ops.attention_block  # 64 iterations of the loop; a 128k cache on a GPU would be 128
    decode_step = _runs(ops, 1, keys)
    assert "cond" in decode_step and "while" not in decode_step
    assert "while" in _runs(ops, 2, keys)  # a prompt chunk keeps the blockwise loop
    assert "cond" not in _runs(ops, 1, ops.attention_block)  # a short cache: one dot over all of it


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_decode_windows_read_only_their_window(dtype, atol):
    # 40 slots: windows of 5, 10, 15 and 20, then the whole cache. Values past a row's window are NaN, which any
    # read of them would carry into the output (0 x NaN); the result must equal attention over the filled part.
    rng = np.random.default_rng(11)
    b, s, d = 2, 40, 16
    q = jnp.asarray(rng.standard_normal((b, 1, 6, d)), dtype)
    k, v = (rng.standard_normal((b, 2, s, d)).astype(np.float32) for _ in range(2))
    run = jax.jit(lambda q, k, v, qp, kp, n: attn.decode_windows(q, k, v, attn.position_mask(qp, kp), n))
    for filled in (1, 4, 5, 6, 14, 20, 21, 39):
        window = next((n for n in (5, 10, 15, 20) if filled <= n), s)
        pad = 2 if filled > 4 else 0  # row 1 left-padded, so that its positions are not its slots
        kv_positions = np.where(np.arange(s) < filled, np.arange(s), -1)[None].repeat(b, 0)
        kv_positions[1, :filled] = np.arange(filled) - pad
        kv_positions[1, :pad] = -1
        q_positions = kv_positions[:, filled - 1:filled]
        poisoned = v.copy()
        poisoned[:, :, window:] = np.nan
        out = run(q, jnp.asarray(k, dtype), jnp.asarray(poisoned, dtype), jnp.asarray(q_positions),
                  jnp.asarray(kv_positions), jnp.int32(filled))
        f32 = [jnp.asarray(a[:, :, :filled], jnp.float32) for a in (k, v)]
        mask = attn.position_mask(jnp.asarray(q_positions), jnp.asarray(kv_positions[:, :filled]))
        reference = attn.einsum_attention(q.astype(jnp.float32), *f32, mask, heads_first=True)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np.asarray(reference), atol=atol,
                                   err_msg=f"{filled} slots filled")


# --- chunked prefill --------------------------------------------------------------------------------------------

def _prefill(params, tokens, positions, config, chunk, cache_len=48):
    ops = dataclasses.replace(select_ops(config), attention_block=BLOCK)
    cache = init_cache(config, tokens.shape[0], cache_len)
    run = jax.jit(functools.partial(engine.prefill_logits, config=config, ops=ops, chunk=chunk))
    logits, cache = run(params, jnp.asarray(tokens), jnp.asarray(positions), cache)
    # One more token through the filled cache: its logits check every cached key and value.
    nxt = jnp.asarray(tokens[:, :1])
    after, _ = jax.jit(functools.partial(forward, config=config, ops=ops))(
        params, nxt, jnp.asarray(positions[:, -1:] + 1), cache)
    return np.asarray(logits[:, 0]), np.asarray(after[:, 0])


def test_chunked_prefill_equals_one_shot_and_hf_on_a_ragged_batch():
    state, params = _setup(CONFIG)
    rng = np.random.default_rng(1)
    lengths, width = (30, 17, 9), 30
    tokens = np.zeros((len(lengths), width), np.int32)
    positions = np.full((len(lengths), width), -1, np.int32)
    rows = [rng.integers(0, CONFIG.vocab_size, n) for n in lengths]
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        positions[i, width - len(row):] = np.arange(len(row))
    one_shot = _prefill(params, tokens, positions, CONFIG, chunk=64)
    for chunk in (8, 7):  # the tail: 6 tokens, then 2
        chunked = _prefill(params, tokens, positions, CONFIG, chunk=chunk)
        for ours, ref in zip(chunked, one_shot):
            assert_logits_close(ours, ref)
    last, after = chunked
    for i, row in enumerate(rows):
        extended = np.concatenate([row, tokens[i, :1]])
        reference = hf_logits(state, CONFIG, extended[None])[0]
        assert_logits_close(last[i], reference[len(row) - 1])
        assert_logits_close(after[i], reference[len(row)])


def test_scaled_rope_far_out_matches_hf():
    # Llama 3.1's low-frequency scaling shows at long range: 20 tokens at positions 40 000 and on, chunked.
    state, params = _setup(SCALED, seed=2)
    tokens = np.random.default_rng(2).integers(0, SCALED.vocab_size, (2, 20)).astype(np.int32)
    positions = (np.arange(20) + np.array([[40000], [70001]])).astype(np.int32)
    last, after = _prefill(params, tokens, positions, SCALED, chunk=BLOCK, cache_len=32)
    extended = np.concatenate([tokens, tokens[:, :1]], axis=1)
    reference = hf_logits(state, SCALED, extended, np.concatenate([positions, positions[:, -1:] + 1], axis=1))
    assert_logits_close(last, reference[:, -2])
    assert_logits_close(after, reference[:, -1])


# --- the Generator --------------------------------------------------------------------------------------------

def test_generator_tokens_do_not_depend_on_the_chunk_or_kv_dtype_default():
    _, params = _setup(CONFIG)
    prompts = [list(np.random.default_rng(3).integers(1, 128, n)) for n in (41, 5, 23)]
    reference = Generator(params, CONFIG, prefill_chunk=512).generate(prompts, max_new_tokens=6)
    chunked = Generator(params, CONFIG, prefill_chunk=16, kv_dtype="float32")
    chunked.ops = dataclasses.replace(chunked.ops, attention_block=BLOCK)  # the blockwise path, unrolled layers
    assert chunked.generate(prompts, max_new_tokens=6).tokens == reference.tokens
    # Prompts beyond one chunk are bucketed to a multiple of it, not to a power of two.
    assert {key[1][1] for key in chunked.executables if key[0] == "prefill"} == {48}
    bf16 = Generator(params, CONFIG, prefill_chunk=16, kv_dtype="bfloat16").generate(prompts, max_new_tokens=6)
    assert [len(t) for t in bf16.tokens] == [6, 6, 6]


def test_generator_tokens_with_the_decode_windows():
    # The windows through which XLA's ops read a cache longer than one block in a decode step (an accelerator's
    # way at every length), here with blocks of 8 slots. The cache holds 8 prompt slots and 64 new: its windows
    # of 9, 18, 27 and 36 slots and the whole cache each serve some of the 40 steps.
    _, params = _setup(CONFIG)
    prompts = [list(np.random.default_rng(5).integers(1, 128, n)) for n in (3, 5, 2)]
    reference = Generator(params, CONFIG).generate(prompts, max_new_tokens=40)
    windows = Generator(params, CONFIG)
    windows.ops = dataclasses.replace(windows.ops, cache_kernel="windows", attention_block=BLOCK)
    assert windows.generate(prompts, max_new_tokens=40).tokens == reference.tokens
    # Every choice a GPU makes, which CI can only run here: XLA's dots, the windows past one block, prompt chunks
    # of 4 through the blockwise loop without a scores budget.
    gpu = Generator(params, CONFIG, packed_weights=False, prefill_chunk=4)
    gpu.ops = dataclasses.replace(select_ops(CONFIG, backend="gpu"), attention_block=BLOCK, windows_min_keys=BLOCK)
    assert gpu.ops.dense_kernel == "xla" and gpu.ops.scores_budget == 0
    assert gpu.generate(prompts, max_new_tokens=40).tokens == reference.tokens


def test_prompt_bucket_leaves_room_for_the_new_tokens_within_max_seq_len():
    _, params = _setup(CONFIG)
    prompt = list(np.random.default_rng(4).integers(1, 128, 250))
    capped = Generator(params, CONFIG, prefill_chunk=16)  # bucket 256, capped at 256 - 6 slots
    out = capped.generate([prompt], max_new_tokens=6)
    assert [key[1][1] for key in capped.executables if key[0] == "prefill"] == [250]
    roomy = Generator(params, CONFIG.replace(max_seq_len=512), prefill_chunk=16).generate([prompt], max_new_tokens=6)
    assert out.tokens == roomy.tokens and len(out.tokens[0]) == 6


def test_a_cache_the_device_cannot_hold_is_one_generation_error(monkeypatch):
    _, params = _setup(CONFIG)
    gen = Generator(params, CONFIG)

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 2 ** 20, "bytes_in_use": 2 ** 20 - 2 ** 16}

    monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
    with pytest.raises(GenerationError, match=r"KV cache of 1 x 256 slots \(float32\) needs 0 MiB; the device "
                                              r"has 0 MiB free of 1 MiB"):
        gen.generate([[1] * 200], max_new_tokens=50)  # 128 KiB of cache, 64 KiB free


@pytest.mark.parametrize("scan_layers", [True, False])
def test_prefill_temporary_memory_stays_flat_as_the_prompt_grows(scan_layers):
    config = CONFIG.replace(max_seq_len=4096, scan_layers=scan_layers)
    params = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    ops = dataclasses.replace(select_ops(config), attention_block=256)  # the same blocks on every backend

    def temp_bytes(prompt, chunk):
        def run(params, tokens):  # a fresh cache, as engine.prefill makes
            return engine.prefill_logits(params, tokens, tokens, init_cache(config, 1, prompt + 8), config=config,
                                         ops=ops, chunk=chunk)

        tokens = jax.ShapeDtypeStruct((1, prompt), jnp.int32)
        return jax.jit(run).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(512, 128), temp_bytes(2048, 128)
    assert large <= 1.05 * small, (small, large)
    # One piece, for comparison: the activations of the whole prompt at once.
    assert temp_bytes(2048, 2048) > 2 * large


def test_cli_checks_prefill_chunk():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("generate_cli", Path(__file__).resolve().parents[1] / "generate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.parse_args(["--checkpoint", "x", "--prompt", "y", "--prefill-chunk", "0"])
    with pytest.raises(cli.UsageError, match="--prefill-chunk must be >= 1"):
        cli.check_args(args)
    args = cli.parse_args(["--checkpoint", "x", "--prompt", "y", "--kv-dtype", "bfloat16"])
    assert args.kv_dtype == "bfloat16" and args.prefill_chunk == 512
