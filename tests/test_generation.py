"""Generation with the KV cache and the on-device loop against a plain loop that recomputes the whole forward
pass for every token (no cache), plus stop ids, buckets/compilation, streaming and the generate.py CLI."""

import dataclasses
import importlib.util
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import random_meta_state
from llama_jax.config import preset
from llama_jax.generation import TRACE_COUNTS, GenerationError, Generator, IncrementalDecoder, fit_dialog
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward
from llama_jax.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
LLAMA2_TOKENIZER = TOKENIZERS / "llama2" / "tokenizer.model"
needs_llama2_tokenizer = pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(),
                                            reason=f"real Llama 2 tokenizer not found at {LLAMA2_TOKENIZER}")

# GQA (4 query heads on 2 kv heads), Llama 3 rope theta; weights with unit-scale logits so greedy has clear winners.
CONFIG = preset("tiny-llama3", vocab_size=256, max_seq_len=64)
PARAMS = jax.tree.map(jnp.asarray, params_from_meta(
    {k: v.numpy() for k, v in random_meta_state(CONFIG, seed=0).items()}, CONFIG))
PROMPTS = ([1, 17, 33, 101, 7], [1, 200, 5, 9, 9, 31, 64, 2, 250, 77, 13, 40], [1], [1, 90, 91, 92, 93, 94, 95, 96, 97])
N_NEW = 12


_full_forward = jax.jit(lambda params, tokens: forward(params, tokens, jnp.arange(tokens.shape[1])[None],
                                                      config=CONFIG)[0])
WIDTH = 32  # fixed width so the reference compiles once; causal attention keeps the tail out of earlier logits


@lru_cache(maxsize=None)
def uncached_greedy(prompt: tuple, n: int) -> tuple:
    """Greedy decoding the slow obvious way: the whole sequence through model.forward (no cache) at every step."""
    ids = list(prompt)
    assert len(ids) + n <= WIDTH
    for _ in range(n):
        window = np.zeros((1, WIDTH), np.int32)
        window[0, : len(ids)] = ids
        logits = _full_forward(PARAMS, jnp.asarray(window))
        ids.append(int(np.argmax(np.asarray(logits[0, len(ids) - 1]))))
    return tuple(ids[len(prompt):])


@pytest.fixture(scope="module")
def gen():
    return Generator(PARAMS, CONFIG)


# --- correctness of the cached loop --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["default", "xla-dots", pytest.param("scan", marks=pytest.mark.slow)])
def test_cached_greedy_equals_uncached_recompute(layout, gen):
    # default: on a CPU, the weights packed for packed_matmul's kernel; the reference runs XLA's dots.
    if layout == "xla-dots":
        gen = Generator(PARAMS, CONFIG, packed_weights=False)
    if layout == "scan":
        gen = Generator(PARAMS, CONFIG, scan_layers=True)
    out = gen.generate(list(PROMPTS), max_new_tokens=N_NEW)
    for i, prompt in enumerate(PROMPTS):
        assert tuple(out.tokens[i]) == uncached_greedy(tuple(prompt), N_NEW), f"row {i} ({layout})"
    assert out.finish_reasons == ["length"] * len(PROMPTS)


@pytest.mark.slow
def test_ragged_batch_rows_equal_rows_alone(gen):
    batch = gen.generate(list(PROMPTS), max_new_tokens=N_NEW)
    for i, prompt in enumerate(PROMPTS):
        assert gen.generate([prompt], max_new_tokens=N_NEW).tokens[0] == batch.tokens[i], f"row {i}"
    # Sampling too: row 0 draws from the same key stream (fold_in(step, row)) whatever the batch holds.
    sampling = SamplingParams(temperature=1.0, top_p=0.9)
    batch = gen.generate(list(PROMPTS), max_new_tokens=N_NEW, sampling=sampling, seed=3)
    alone = gen.generate([PROMPTS[0]], max_new_tokens=N_NEW, sampling=sampling, seed=3)
    assert alone.tokens[0] == batch.tokens[0]


def _first_new_token_at(seq, k):
    """(j, seq[j]) for the smallest j >= k whose token does not occur before it; if the sequence only repeats
    itself from k on, the last such j before k (index 0 always qualifies)."""
    fresh = [j for j in range(len(seq)) if seq[j] not in seq[:j]]
    j = next((j for j in fresh if j >= k), fresh[-1])
    return j, seq[j]


def test_stop_id_ends_each_row_at_its_first_occurrence():
    refs = [uncached_greedy(tuple(p), N_NEW) for p in PROMPTS]
    j, stop = _first_new_token_at(refs[0], 3)
    assert j > 0
    out = Generator(PARAMS, CONFIG, stop_ids=[stop]).generate(list(PROMPTS), max_new_tokens=N_NEW)
    for i, ref in enumerate(refs):
        if stop in ref:
            assert out.tokens[i] == list(ref[: ref.index(stop)]) and out.finish_reasons[i] == "stop", f"row {i}"
        else:
            assert out.tokens[i] == list(ref) and out.finish_reasons[i] == "length", f"row {i}"
    assert out.tokens[0] == list(refs[0][:j])


def test_loop_ends_early_when_all_rows_stopped():
    refs = [uncached_greedy(tuple(p), N_NEW) for p in PROMPTS]
    # One stop id per row (a token it produces around step 2, 4, 3, 5): every row stops before N_NEW.
    picks = [_first_new_token_at(ref, k) for ref, k in zip(refs, (2, 4, 3, 5))]
    stops = {tok for _, tok in picks}
    out = Generator(PARAMS, CONFIG, stop_ids=stops).generate(list(PROMPTS), max_new_tokens=N_NEW)
    ends = [min(ref.index(s) for s in stops if s in ref) for ref in refs]
    assert [len(t) for t in out.tokens] == ends
    assert out.finish_reasons == ["stop"] * len(PROMPTS)
    assert out.steps == max(ends) + 1 < N_NEW  # the loop stopped when the last row did, not at max_new_tokens


# --- buckets, streaming, sampling ----------------------------------------------------------------------------

def test_decode_loop_compiles_once_per_bucket():
    gen = Generator(PARAMS, CONFIG)
    before = dict(TRACE_COUNTS)
    first = gen.generate([[1, 2, 3], [1, 5, 6, 7, 8, 9, 10]], max_new_tokens=10)
    second = gen.generate([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 9]], max_new_tokens=9)  # same buckets
    assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
    assert TRACE_COUNTS["decode"] - before.get("decode", 0) == 1
    assert len(gen.executables) == 2
    assert first.compile_seconds > 0 and second.compile_seconds == 0
    # Streaming reuses the same executables; a different temperature is a traced value, not a new compile.
    list(gen.stream([[1, 2], [1, 3]], max_new_tokens=10, chunk_size=3))
    assert len(gen.executables) == 2
    sampled = gen.generate([[1, 2], [1, 3]], max_new_tokens=10, sampling=SamplingParams(temperature=0.5))
    gen.generate([[1, 2], [1, 3]], max_new_tokens=10, sampling=SamplingParams(temperature=1.5))
    assert len(gen.executables) == 4 and sampled.compile_seconds > 0


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, top_p=0.9)])
def test_stream_yields_what_generate_returns(gen, sampling):
    whole = gen.generate(list(PROMPTS), max_new_tokens=N_NEW, sampling=sampling, seed=5)
    chunks = list(gen.stream(list(PROMPTS), max_new_tokens=N_NEW, sampling=sampling, seed=5, chunk_size=5))
    assert [len(t) for t in chunks[0].tokens] == [1] * len(PROMPTS)  # the first token comes straight from prefill
    assert all(len(t) <= 5 for c in chunks[1:] for t in c.tokens)
    assert chunks[-1].done == [True] * len(PROMPTS)
    joined = [sum((c.tokens[i] for c in chunks), []) for i in range(len(PROMPTS))]
    assert joined == whole.tokens


def test_sampling_is_reproducible_for_a_seed(gen):
    sampling = SamplingParams(temperature=1.0, top_k=50)
    a = gen.generate(list(PROMPTS), max_new_tokens=N_NEW, sampling=sampling, seed=11).tokens
    b = gen.generate(list(PROMPTS), max_new_tokens=N_NEW, sampling=sampling, seed=11).tokens
    c = gen.generate(list(PROMPTS), max_new_tokens=N_NEW, sampling=sampling, seed=12).tokens
    assert a == b and a != c
    # top_k=1 with any temperature is greedy.
    k1 = gen.generate(list(PROMPTS), max_new_tokens=N_NEW, sampling=SamplingParams(temperature=2.0, top_k=1), seed=4)
    assert k1.tokens == [list(uncached_greedy(tuple(p), N_NEW)) for p in PROMPTS]


def test_generation_stops_at_max_seq_len():
    config = CONFIG.replace(max_seq_len=20)
    gen = Generator(PARAMS, config)
    out = gen.generate([list(range(1, 18)), [1, 2]], max_new_tokens=10)
    assert [len(t) for t in out.tokens] == [3, 3]  # the longest prompt sets the limit, as in Meta's generate
    assert out.tokens[0] == list(uncached_greedy(tuple(range(1, 18)), 3))
    with pytest.raises(GenerationError, match="prompt 0 has 20 tokens; max_seq_len=20"):
        gen.generate([list(range(20))], max_new_tokens=4)


@pytest.mark.parametrize("prompts,kw,match", [
    ([], {}, "empty batch"),
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], [1, 300]], {}, r"prompt 1 has ids outside \[0, 256\)"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_inputs_raise_generation_error(gen, prompts, kw, match):
    with pytest.raises(GenerationError, match=match):
        gen.generate(prompts, **kw)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the compiler options are XLA:CPU's")
def test_cpu_compiler_options_reach_the_compiled_decode_loop():
    # XLA's attention ops (the C++ decode kernel would leave no dot for YNNPACK to take in either generator).
    gen, plain = Generator(PARAMS, CONFIG), Generator(PARAMS, CONFIG, compiler_options={})
    for g in (gen, plain):
        g.ops = dataclasses.replace(g.ops, cache_kernel="windows")
    gen.generate([list(PROMPTS[0])], max_new_tokens=4)
    decode = [exe for key, exe in gen.executables.items() if key[0] == "decode"]
    assert decode and all("ynn_fusion" not in exe.as_text() for exe in decode)  # YNNPACK's dots are off
    plain.generate([list(PROMPTS[0])], max_new_tokens=4)
    # Without the options this jaxlib does use YNNPACK here, so the check above is not vacuous.
    assert any("ynn_fusion" in exe.as_text() for key, exe in plain.executables.items() if key[0] == "decode")
    assert plain.generate([list(PROMPTS[0])], max_new_tokens=4).tokens == gen.generate([list(PROMPTS[0])],
                                                                                        max_new_tokens=4).tokens
    # Prefill keeps XLA's defaults: its products have a prompt's rows, where YNNPACK was faster.
    assert all("ynn_fusion" in exe.as_text() for key, exe in gen.executables.items() if key[0] == "prefill")


def test_unknown_compiler_option_falls_back_to_defaults():
    # A jaxlib that does not know an option (they are experimental) must still generate.
    odd = Generator(PARAMS, CONFIG, compiler_options={"xla_no_such_option_here": ""})
    out = odd.generate([list(PROMPTS[1])], max_new_tokens=N_NEW)
    assert tuple(out.tokens[0]) == uncached_greedy(tuple(PROMPTS[1]), N_NEW)
    assert odd.compiler_options == odd.prefill_compiler_options == {}


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_incremental_decoder_deltas_join_to_full_text(name):
    """Deltas of a text's ids, one by one, and of random ids (byte pieces that split characters included) in
    chunks of random sizes, join to the tokenizer's decoding of the whole sequence."""
    from llama_jax.tokenizer import load_tokenizer

    path = TOKENIZERS / name / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"real {name} tokenizer not found at {path}")
    tok = load_tokenizer(path)
    text = "Hello wörld, 日本語 and emoji 🙂 end."
    ids = tok.encode(text, bos=False, eos=False)  # Llama 3 decodes its BOS as text
    dec = IncrementalDecoder(tok)
    deltas = [dec.push([i]) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == text == dec.text
    assert "\ufffd" not in "".join(deltas)

    rng = np.random.default_rng(0)
    word = tok.encode(" end", bos=False, eos=False)  # a complete last piece: nothing is held back at the end
    for _ in range(20):
        ids = [*map(int, rng.integers(3, min(tok.vocab_size, 128000), size=300)), *word]
        dec, deltas, i = IncrementalDecoder(tok), [], 0
        while i < len(ids):
            n = int(rng.integers(1, 5))
            deltas.append(dec.push(ids[i:i + n]))
            i += n
        assert "".join(deltas) == tok.decode(ids)


@needs_llama2_tokenizer
def test_fit_dialog_drops_oldest_exchanges():
    from llama_jax.chat import encode_llama2_dialog
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(LLAMA2_TOKENIZER)
    dialog = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        dialog += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    dialog.append({"role": "user", "content": "last"})
    full = encode_llama2_dialog(tok, dialog)
    kept, ids = fit_dialog(tok, dialog, len(full) - 10)
    assert kept[0] == dialog[0] and kept[-1] == dialog[-1] and len(kept) < len(dialog)
    assert ids == encode_llama2_dialog(tok, kept) and len(ids) < len(full) - 10
    assert fit_dialog(tok, dialog, len(full) + 1) == (dialog, full)


# --- the CLI -------------------------------------------------------------------------------------------------

CLI_CONFIG = preset("tiny-llama2", vocab_size=32000, dim=32, n_heads=4, max_seq_len=48)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if not LLAMA2_TOKENIZER.is_file():
        pytest.skip(f"real Llama 2 tokenizer not found at {LLAMA2_TOKENIZER}")
    from llama_jax.checkpoint import save_model
    from llama_jax.model import init_params

    folder = tmp_path_factory.mktemp("cli") / "model"
    params = jax.tree.map(jnp.asarray, params_from_meta(
        {k: v.numpy() for k, v in random_meta_state(CLI_CONFIG, seed=1).items()}, CLI_CONFIG))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(CLI_CONFIG, jax.random.key(0)))
    save_model(folder, params, CLI_CONFIG, LLAMA2_TOKENIZER)
    return folder


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expected_texts(model_dir, prompts, max_new, chat=False):
    from llama_jax.checkpoint import load_model
    from llama_jax.generation import encode_chat
    from llama_jax.tokenizer import load_tokenizer

    params, config, tok_path = load_model(model_dir)
    tok = load_tokenizer(tok_path)
    ids = [encode_chat(tok, [{"role": "user", "content": p}]) if chat else tok.encode(p, bos=True, eos=False)
           for p in prompts]
    out = Generator(params, config, stop_ids=tok.stop_ids, pad_id=tok.pad_id).generate(ids, max_new_tokens=max_new)
    return [tok.decode(t) for t in out.tokens]


@pytest.mark.slow
def test_cli_batch_end_to_end(model_dir):
    prompts = ["Hello", "The sky is blue because"]
    cmd = [sys.executable, str(ROOT / "generate.py"), "--checkpoint", str(model_dir), "--max-new-tokens", "7",
           "--temperature", "0", "--prompt", prompts[0], "--prompt", prompts[1]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    texts = _expected_texts(model_dir, prompts, 7)
    assert proc.stdout == "".join(f"--- {i + 1}: {p}\n{t}\n" for i, (p, t) in enumerate(zip(prompts, texts)))
    assert "tokens/s" in proc.stderr and "time to first token" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_streams_a_single_prompt(model_dir, cli, capsys, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\nOnce upon a time\n\n")
    assert cli.main(["--checkpoint", str(model_dir), "--prompts-file", str(prompts_file), "--max-new-tokens", "9",
                     "--temperature", "0", "--chunk-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert out == _expected_texts(model_dir, ["Once upon a time"], 9)[0] + "\n"
    assert "time to first token" in err


@pytest.mark.slow
def test_cli_chat_prompt_and_repl(model_dir, cli, capsys, monkeypatch):
    assert cli.main(["--checkpoint", str(model_dir), "--chat", "--prompt", "Hi there", "--max-new-tokens", "5",
                     "--temperature", "0"]) == 0
    out, _ = capsys.readouterr()
    assert out == _expected_texts(model_dir, ["Hi there"], 5, chat=True)[0] + "\n"
    # Interactive: two turns from stdin, then end of input.
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nAnd then?\n"))
    assert cli.main(["--checkpoint", str(model_dir), "--chat", "--system", "Be brief.", "--max-new-tokens", "4",
                     "--temperature", "0.7", "--top-p", "0.9", "--dtype", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    assert out.count("assistant> ") == 2
    assert err.count("tokens/s") == 2


def _error_line(capsys):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["--checkpoint", "{missing}", "--prompt", "x"], "--checkpoint"),
    (["--checkpoint", "{model}", "--prompt", "word " * 60], "max_seq_len=48"),
    (["--checkpoint", "{model}"], "empty batch"),
    (["--checkpoint", "{model}", "--prompts-file", "{empty}"], "no prompts"),
    (["--checkpoint", "{model}", "--prompt", "x", "--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--checkpoint", "{model}", "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--checkpoint", "{model}", "--prompt", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--checkpoint", "{model}", "--prompt", "x", "--top-k", "-1"], "--top-k"),
    (["--checkpoint", "{model}", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--checkpoint", "{noconfig}", "--prompt", "x"], "config.json"),
])
def test_cli_bad_input_gives_one_error_line(argv, needle, model_dir, cli, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "noconfig").mkdir()
    paths = {"{missing}": str(tmp_path / "nope"), "{model}": str(model_dir), "{empty}": str(tmp_path / "empty.txt"),
             "{noconfig}": str(tmp_path / "noconfig")}
    assert cli.main([paths.get(a, a) for a in argv]) == 2
    assert needle in _error_line(capsys)


def test_cli_bad_flag_value_gives_one_error_line(cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--checkpoint", "x", "--prompt", "y", "--temperature", "warm"])
    assert exit_info.value.code == 2
    assert "--temperature" in _error_line(capsys)


def test_from_checkpoint_reads_each_leaf_into_place_without_a_second_copy(tmp_path, monkeypatch):
    from llama_jax import checkpoint as ckpt
    from llama_jax.inference import weights

    ckpt.save_model(tmp_path / "model", PARAMS, CONFIG, None)
    reads, read_leaves = [], ckpt.load_param_leaves

    def spy(*args):  # after each leaf, what the process holds: the layout made so far and nothing more
        for path, leaf in read_leaves(*args):
            reads.append(leaf.nbytes)
            yield path, leaf
            reads.append(sum(a.nbytes for a in jax.live_arrays()) - baseline)

    monkeypatch.setattr(weights.ckpt, "load_param_leaves", spy)
    baseline = sum(a.nbytes for a in jax.live_arrays())
    gen = Generator.from_checkpoint(tmp_path / "model", stop_ids=[], packed_weights=False)
    total = sum(leaf.nbytes for leaf in jax.tree.leaves(gen.params))
    assert total == sum(leaf.nbytes for leaf in jax.tree.leaves(PARAMS)) and "layers_1" in gen.params
    stored, held = reads[0::2], reads[1::2]
    assert len(held) == len(jax.tree.leaves(PARAMS))
    # In the end the layout and nothing else (a few bytes of jax's own constants aside): no stored leaf is kept.
    assert total <= held[-1] < total + min(stored)
    assert held == sorted(held)  # grows by one leaf's decoding form at a time
    assert gen.generate(list(PROMPTS), max_new_tokens=N_NEW).tokens == \
        Generator(PARAMS, CONFIG, packed_weights=False).generate(list(PROMPTS), max_new_tokens=N_NEW).tokens
