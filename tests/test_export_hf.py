"""convert_weights.py --to-hf: a model folder -> a Hugging Face folder that transformers loads as is.

The exported folder is read back with transformers' own loaders (LlamaForCausalLM, AutoTokenizer), so a missed
q/k permutation, a wrong rope_scaling, a lost tied head, a tokenizer that splits differently or a chat template
that lays a dialog out differently all show up as a difference from our model, tokenizer or chat format.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from hf_reference import hf_model_from_meta, random_meta_state
from llama_jax.chat import encode_llama2_dialog, encode_llama3_dialog
from llama_jax.checkpoint import save_model
from llama_jax.config import LlamaConfig, RopeScaling
from llama_jax.convert import convert, export_hf
from llama_jax.convert import hf_export as hf_export_lib
from llama_jax.meta_weights import params_from_meta
from llama_jax.model import forward
from llama_jax.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import convert_weights  # noqa: E402  (the root CLI)

SHARED_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
_BASE = dict(dim=64, n_layers=2, n_heads=4, multiple_of=32, vocab_size=512)
_LLAMA3 = dict(_BASE, n_kv_heads=2, rope_theta=500000.0)
CASES = {
    "mha": (LlamaConfig(**_BASE, max_seq_len=4096), 0),
    "gqa": (LlamaConfig(**_LLAMA3, ffn_dim_multiplier=1.3, max_seq_len=8192), 0),
    # Llama 3.1: scaled RoPE, checked far beyond original_max_position_embeddings.
    "llama3.1-scaled-rope": (LlamaConfig(**_LLAMA3, use_scaled_rope=True, rope_scaling=RopeScaling(factor=8.0),
                                         max_seq_len=131072), 30000),
    # Llama 3.2: factor 32 and tied embeddings (no lm_head tensor in the export).
    "llama3.2-tied": (LlamaConfig(**_LLAMA3, use_scaled_rope=True, rope_scaling=RopeScaling(factor=32.0),
                                  tie_embeddings=True, max_seq_len=131072), 30000),
}


def byte_ranks_file(path: Path) -> Path:
    """A tiktoken ranks file with the 256 single bytes only: a valid Llama 3-style tokenizer of 512 ids."""
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path


def model_folder(folder: Path, config: LlamaConfig, tokenizer: Path, seed: int = 0):
    params = params_from_meta({k: v.numpy() for k, v in random_meta_state(config, seed).items()}, config)
    save_model(folder, params, config, tokenizer)
    return params


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = convert_weights.main(["--quiet", *args])
    return rc, capsys.readouterr().err


def hf_and_our_logits(hf_dir: Path, params, config: LlamaConfig, start: int) -> tuple[np.ndarray, np.ndarray]:
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))
    positions = np.broadcast_to(np.arange(12) + start, tokens.shape).copy()
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(tokens), position_ids=torch.as_tensor(positions)).logits.numpy()
    ours, _ = forward(params, tokens, positions, config=config)
    return theirs, np.asarray(ours)


def chat_ids(tokenizer, dialog, **kw) -> list[int]:
    out = tokenizer.apply_chat_template(dialog, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


# --- weights and config: transformers computes our logits -------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_exported_model_gives_our_logits(tmp_path, capsys, name):
    config, start = CASES[name]
    params = model_folder(tmp_path / "model", config, byte_ranks_file(tmp_path / "ranks"))
    # A small shard size splits the export into several files, as 5GB does for a real model.
    rc, err = run_cli(capsys, "--to-hf", "--input", str(tmp_path / "model"), "--output", str(tmp_path / "hf"),
                      "--max-shard-size", "100KB")
    assert rc == 0, err
    hf = tmp_path / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in hf.glob("*.safetensors")) == files
    assert ("lm_head.weight" in index["weight_map"]) == (not config.tie_embeddings)
    for f in files:  # a file holds at most 100KB of tensors, or a single larger one
        with safe_open(str(hf / f), framework="pt") as st:
            sizes = [st.get_tensor(k).nbytes for k in st.keys()]
        assert sum(sizes) <= 100_000 or len(sizes) == 1, (f, sizes)

    loaded = transformers.AutoConfig.from_pretrained(hf)
    assert (loaded.num_key_value_heads, loaded.tie_word_embeddings) == (config.kv_heads, config.tie_embeddings)
    theirs, ours = hf_and_our_logits(hf, params, config, start)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    # The stop ids of the (Llama 3-style) tokenizer: <|end_of_text|>, <|eom_id|>, <|eot_id|>.
    generation = json.loads((hf / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 256 and generation["eos_token_id"] == [257, 264, 265]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model", "ranks"]


def test_scaled_rope_matters(tmp_path):
    """Exported without its rope_scaling the 3.1 model's logits at position 30000 differ: the check above can
    fail."""
    config, start = CASES["llama3.1-scaled-rope"]
    params = model_folder(tmp_path / "model", config, byte_ranks_file(tmp_path / "ranks"))
    export_hf(tmp_path / "model", tmp_path / "hf", progress=False)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["rope_scaling"]["rope_type"] == "llama3" and hf_config["rope_scaling"]["factor"] == 8.0
    hf_config["rope_scaling"] = None
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config))
    theirs, ours = hf_and_our_logits(tmp_path / "hf", params, config, start)
    assert np.abs(ours - theirs).max() > 5 * 1e-4 * np.abs(theirs).max()  # 5x the tolerance used above


def test_export_reads_one_tensor_at_a_time(tmp_path, monkeypatch):
    """No read returns more than one layer's largest tensor (embedding rows come in blocks of that size), so memory
    does not grow with the number of layers or the vocabulary."""
    config = LlamaConfig(**{**_LLAMA3, "n_layers": 6, "vocab_size": 4096}, max_seq_len=8192)
    model_folder(tmp_path / "model", config, byte_ranks_file(tmp_path / "ranks"))
    real, sizes = hf_export_lib.OrbaxSlices.read, []

    def read(self, keys, index):
        value = real(self, keys, index)
        sizes.append(value.nbytes)
        return value

    monkeypatch.setattr(hf_export_lib.OrbaxSlices, "read", read)
    export_hf(tmp_path / "model", tmp_path / "hf", progress=False)
    assert max(sizes) == config.dim * config.hidden_dim * 4 and len(sizes) > 9 * config.n_layers


# --- HF -> ours -> HF is exact ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.bfloat16, True)])
def test_round_trip_hf_ours_hf_is_bit_identical(tmp_path, capsys, dtype, tied):
    config = LlamaConfig(**_LLAMA3, use_scaled_rope=True, rope_scaling=RopeScaling(factor=8.0), tie_embeddings=tied,
                         max_seq_len=131072)
    model = hf_model_from_meta(random_meta_state(config, 5), config).to(dtype)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    byte_ranks_file(tmp_path / "hf" / "tokenizer.model")
    assert run_cli(capsys, "--input", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"))[0] == 0
    rc, err = run_cli(capsys, "--to-hf", "--input", str(tmp_path / "ours"), "--output", str(tmp_path / "back"))
    assert rc == 0, err

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    original, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor), name
    # Importing the export again gives the same model description.
    again = convert(tmp_path / "back", tmp_path / "again", progress=False).config
    assert again == convert(tmp_path / "hf", tmp_path / "first", progress=False).config


# --- tokenizer and chat template: transformers gives our ids ------------------------------------------------------

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # O(2^n)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }\r\n",
    "naïve café, Ångström, 日本語のテキスト, Привет мир, العربية, 🦙🚀 emoji and ZWJ 👩‍💻",
    "   leading spaces", "trailing spaces   ", "tabs\t\tand\n\n\nnewlines \n \n", " ", "", "a" * 300,
    "3.14159265358979 1234567890 1,000,000 0x1F 1e-10 -42",
    "<|eot_id|> <|begin_of_text|>text<|end_of_text|> <|reserved_special_token_3|> <s>[INST] hi [/INST]</s>",
    "<<SYS>> not a system prompt <</SYS>> <unk> <|not_special|> <|reserved_special_token_999|>",
    "don't I'LL we've THEY'RE   'quoted'  \u00a0non-breaking\u3000ideographic space",
]
LLAMA3_SPECIAL_TEXT = "<|eot_id|>"


def dialogs():
    system = {"role": "system", "content": "  You are terse.\nAnswer in one line.  "}
    turns = [{"role": "user", "content": "What is 2 + 2?\n"}, {"role": "assistant", "content": " 4 "},
             {"role": "user", "content": "  And café × 3?  "}]
    return [turns[:1], [system, *turns], [system, *turns, {"role": "assistant", "content": "12"},
                                          {"role": "user", "content": "def f():\n    pass"}]]


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def exported_tokenizer(request, tmp_path_factory):
    source = SHARED_TOKENIZERS / request.param / "tokenizer.model"
    if not source.is_file():
        pytest.skip(f"{source} not found: Meta's tokenizer files are needed for this test")
    ours = load_tokenizer(source)
    tmp = tmp_path_factory.mktemp(request.param)
    model_folder(tmp / "model", LlamaConfig(dim=16, n_layers=1, n_heads=2, multiple_of=16,
                                            vocab_size=ours.vocab_size), source)
    export_hf(tmp / "model", tmp / "hf", progress=False)
    return ours, transformers.AutoTokenizer.from_pretrained(tmp / "hf"), tmp / "hf"


def test_tokenizer_gives_our_ids(exported_tokenizer):
    ours, theirs, _ = exported_tokenizer
    for text in CORPUS:
        # split_special_tokens: special-token text in the input is plain text, as in our encode().
        plain = theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert plain == ours.encode(text, bos=False, eos=False), text
        if isinstance(ours, TiktokenTokenizer):  # HF's default matches special-token text, as allowed_special="all"
            assert theirs(text)["input_ids"] == ours.encode(text, bos=True, eos=False, allowed_special="all"), text
        elif "<" not in text:
            assert theirs(text)["input_ids"] == ours.encode(text, bos=True, eos=False), text
        assert theirs.decode(plain) == ours.decode(plain), text


def test_generation_config_has_our_stop_ids(exported_tokenizer):
    ours, theirs, folder = exported_tokenizer
    generation = transformers.GenerationConfig.from_pretrained(folder)
    stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert generation.bos_token_id == ours.bos_id and sorted(stops) == sorted(ours.stop_ids)
    assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
    assert theirs.pad_token_id == ours.pad_id
    if isinstance(ours, TiktokenTokenizer):
        assert sorted(stops) == [128001, 128008, 128009] and ours.bos_id == 128000
        assert theirs.convert_tokens_to_ids(LLAMA3_SPECIAL_TEXT) == ours.eot_id


def test_chat_template_gives_our_chat_layout(exported_tokenizer):
    ours, theirs, _ = exported_tokenizer
    for dialog in dialogs():
        if isinstance(ours, TiktokenTokenizer):
            assert chat_ids(theirs, dialog, add_generation_prompt=True) == encode_llama3_dialog(ours, dialog)
            assert chat_ids(theirs, dialog, add_generation_prompt=False) == encode_llama3_dialog(
                ours, dialog, add_generation_prompt=False)
        else:
            assert isinstance(ours, SentencePieceTokenizer)
            assert chat_ids(theirs, dialog) == encode_llama2_dialog(ours, dialog), dialog


def test_tokenizer_file_travels_along(exported_tokenizer):
    ours, _, folder = exported_tokenizer
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # Where HF repositories keep it: SentencePiece's at the top, Meta's tiktoken ranks in original/.
    copy = folder / ("original/tokenizer.model" if isinstance(ours, TiktokenTokenizer) else "tokenizer.model")
    assert copy.read_bytes() == ours.path.read_bytes()


# --- bad input: one-line error, nothing left behind ---------------------------------------------------------------

def _assert_one_line(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, err = run_cli(capsys, "--to-hf", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "hf"))
    _assert_one_line(rc, err, str(tmp_path / "empty" / "config.json"), "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_bad_tokenizer_and_bad_shard_size(tmp_path, capsys):
    model_folder(tmp_path / "model", CASES["gqa"][0], None)
    args = ["--to-hf", "--input", str(tmp_path / "model"), "--output", str(tmp_path / "hf")]
    _assert_one_line(*run_cli(capsys, *args), "tokenizer.model: missing")
    (tmp_path / "model" / "tokenizer.model").write_text("not a tokenizer")
    _assert_one_line(*run_cli(capsys, *args), "tokenizer.model: ", "expected")
    ranks = [base64.b64encode(i.to_bytes(2, "big")).decode() for i in range(600)]  # 600 + 256 special tokens
    (tmp_path / "model" / "tokenizer.model").write_text("".join(f"{r} {i}\n" for i, r in enumerate(ranks)))
    _assert_one_line(*run_cli(capsys, *args), "tokenizer.model: 856 tokens, more than config.json's vocab_size 512")
    byte_ranks_file(tmp_path / "model" / "tokenizer.model")
    _assert_one_line(*run_cli(capsys, *args, "--max-shard-size", "lots"), "--max-shard-size 'lots'", "5GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    model_folder(tmp_path / "model", CASES["gqa"][0], byte_ranks_file(tmp_path / "ranks"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("precious")
    args = ["--to-hf", "--input", str(tmp_path / "model"), "--output", str(tmp_path / "hf")]
    _assert_one_line(*run_cli(capsys, *args), "hf: already exists (pass --overwrite")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "precious"
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model", "ranks"]


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failed_or_interrupted_export_leaves_nothing(tmp_path, capsys, monkeypatch, failure):
    model_folder(tmp_path / "model", CASES["gqa"][0], byte_ranks_file(tmp_path / "ranks"))
    real = hf_export_lib.OrbaxSlices.read

    def read(self, keys, index):
        if keys[0] == "layers" and index == 1:  # layer 0 and the embedding are already on disk
            raise failure
        return real(self, keys, index)

    monkeypatch.setattr(hf_export_lib.OrbaxSlices, "read", read)
    args = ["--to-hf", "--input", str(tmp_path / "model"), "--output", str(tmp_path / "hf")]
    if isinstance(failure, KeyboardInterrupt):
        rc, err = run_cli(capsys, *args)
        assert rc == 130 and err == "error: interrupted; no output was written\n"
    else:
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_cli(capsys, *args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ranks"]
