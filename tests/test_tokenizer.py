"""llama_jax.tokenizer checked against sentencepiece / tiktoken used directly on Meta's own tokenizer files.

Expected ids never come from our code: they come from the libraries (built here independently of the module),
from Meta's published test values, or from layouts assembled here by hand.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import tiktoken
import tiktoken.load

from llama_jax.tokenizer import (
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    _split_whitespaces_or_nonwhitespaces,
    load_tokenizer,
)
from llama_jax.chat import encode_llama2_dialog, encode_llama3_dialog

SKIP_REASON = "../shared/tokenizers not found: real Meta tokenizer files are needed for this test"
LLAMA2_MD5 = "eeec4125e9c7560836b4873b6f8e3025"
LLAMA3_MD5 = "08292403f8b173e7524d7fba7bbbd2d3"

# Written out here rather than imported, so a typo in the module cannot agree with itself.
LLAMA3_PAT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
# Llama 3.1's special tokens (meta-llama/llama-models, models/llama3_1/api/tokenizer.py), ids 128000..128255.
LLAMA31_SPECIAL = [
    "<|begin_of_text|>",  # 128000
    "<|end_of_text|>",  # 128001
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004
    "<|step_id|>",
    "<|start_header_id|>",  # 128006
    "<|end_header_id|>",  # 128007
    "<|eom_id|>",  # 128008
    "<|eot_id|>",  # 128009
    "<|python_tag|>",  # 128010
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]  # 128011..128255

CORPUS = {
    "empty": "",
    "ascii": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
    "contractions": "I'LL say WE'VE done it, they'd know",
    "accents": "Crème brûlée, naïve café, Ærøskøbing, Straße, ŁÓDŹ",
    "cjk": "東京は日本の首都です。中文测试，한국어 텍스트",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "devanagari": "नमस्ते दुनिया, क्षत्रिय",
    "emoji": "Hi 👋🏽! family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🇫🇷 ❤️",
    "code": "def f(x):\n\treturn x  # tab\n\n\tif x:\r\n\t\tpass\n}\n",
    "whitespace_runs": "a" + " " * 300 + "b" + "\n" * 40 + "\t" * 30 + "c" + " \n \t " * 10,
    "leading_trailing": "   leading and trailing   ",
    "only_spaces": "     ",
    "newline": "\n",
    "special_text": "<|begin_of_text|>Hi<|eot_id|> [INST] <<SYS>>x<</SYS>> [/INST] <s></s><unk>",
    "numbers": "12345678 3.14159 -42 1,000,000 ٣٤٥",
    "odd_chars": "\x00\x07 zero\u200bwidth \u2028 \ufeffbom \U0001d400",
}
CORPUS_IDS = list(CORPUS)
BOS_EOS = [(False, False), (True, False), (False, True), (True, True)]


# ----------------------------------------------------------------------------------------------------- fixtures


def _tokenizer_dir() -> Path:
    env = os.environ.get("LLAMA_JAX_TOKENIZERS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "tokenizers"


def _real_file(family: str) -> Path:
    path = _tokenizer_dir() / family / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"{SKIP_REASON} (looked for {path})")
    return path


def _require_meta_md5(path: Path, md5: str) -> None:
    # Library-vs-library comparisons hold for any file; the hard numbers below are facts about Meta's file only.
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    if actual != md5:
        pytest.skip(f"{path} has md5 {actual}, not Meta's {md5}: Meta-specific values not checked")


@pytest.fixture(scope="module")
def llama2_path() -> Path:
    return _real_file("llama2")


@pytest.fixture(scope="module")
def llama3_path() -> Path:
    return _real_file("llama3")


@pytest.fixture(scope="module")
def sp2(llama2_path) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(llama2_path))


@pytest.fixture(scope="module")
def tok2(llama2_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(llama2_path)


@pytest.fixture(scope="module")
def ranks3(llama3_path) -> dict[bytes, int]:
    # An empty TIKTOKEN_CACHE_DIR stops tiktoken from copying the file into $TMPDIR/data-gym-cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        return tiktoken.load.load_tiktoken_bpe(str(llama3_path))


@pytest.fixture(scope="module")
def tt3(ranks3) -> tiktoken.Encoding:
    special = {name: len(ranks3) + i for i, name in enumerate(LLAMA31_SPECIAL)}
    return tiktoken.Encoding("llama3-reference", pat_str=LLAMA3_PAT, mergeable_ranks=ranks3, special_tokens=special)


@pytest.fixture(scope="module")
def tok3(llama3_path) -> TiktokenTokenizer:
    return TiktokenTokenizer(llama3_path)


def _tt(enc: tiktoken.Encoding, text: str) -> list[int]:
    """Meta's encoding call: special-token text is plain text."""
    return enc.encode(text, allowed_special=set(), disallowed_special=())


# ------------------------------------------------------------------------------------------------------ Llama 2


def test_llama2_ids_from_model(tok2, sp2):
    assert (tok2.bos_id, tok2.eos_id, tok2.vocab_size) == (sp2.bos_id(), sp2.eos_id(), sp2.vocab_size())
    assert tok2.stop_ids == frozenset({sp2.eos_id()})
    assert tok2.pad_id == (sp2.pad_id() if sp2.pad_id() >= 0 else sp2.unk_id())
    assert tok2.pad_id >= 0


def test_llama2_meta_values(tok2, llama2_path, sp2):
    _require_meta_md5(llama2_path, LLAMA2_MD5)
    assert (tok2.bos_id, tok2.eos_id, tok2.vocab_size) == (1, 2, 32000)
    # Meta's model has no pad piece (-1); we pad with unk = 0 so pad is a valid embedding index.
    assert sp2.pad_id() == -1 and tok2.pad_id == 0 == sp2.unk_id()


@pytest.mark.parametrize("bos,eos", BOS_EOS)
@pytest.mark.parametrize("name", CORPUS_IDS)
def test_llama2_encode_matches_sentencepiece(tok2, sp2, name, bos, eos):
    text = CORPUS[name]
    expected = [sp2.bos_id()] * bos + sp2.encode(text) + [sp2.eos_id()] * eos
    assert tok2.encode(text, bos=bos, eos=eos) == expected


@pytest.mark.parametrize("name", CORPUS_IDS)
def test_llama2_decode_and_round_trip(tok2, sp2, name):
    text = CORPUS[name]
    ids = sp2.encode(text)
    assert tok2.decode(ids) == sp2.decode(ids)
    # Llama 2's normaliser is "identity" with byte fallback, so every corpus string survives exactly; the
    # dummy-prefix space that encode adds is removed again by decode.
    assert tok2.decode(tok2.encode(text, bos=False, eos=False)) == text
    # bos/eos are control pieces: decode drops them.
    assert tok2.decode(tok2.encode(text, bos=True, eos=True)) == text
    assert tok2.decode(np.asarray(ids, dtype=np.int32)) == text


def test_llama2_round_trip_caveats(tok2, sp2):
    # U+2581 is SentencePiece's own space marker: in input text it comes back as a plain space.
    assert tok2.decode(tok2.encode("a\u2581b", bos=False, eos=False)) == "a b"
    # A leading space piece is stripped by decode, so token-by-token decoding loses word-initial spaces.
    ids = tok2.encode("hello world", bos=False, eos=False)
    assert "".join(tok2.decode([i]) for i in ids) == "".join(sp2.decode([i]) for i in ids)
    assert "".join(tok2.decode([i]) for i in ids) != "hello world"
    assert tok2.decode([sp2.unk_id()]) == sp2.decode([sp2.unk_id()])


# ------------------------------------------------------------------------------------------------------ Llama 3


def test_llama3_special_tokens(tok3, ranks3, tt3):
    assert list(tok3.special_tokens) == LLAMA31_SPECIAL
    assert tok3.special_tokens == {name: len(ranks3) + i for i, name in enumerate(LLAMA31_SPECIAL)}
    assert tok3.vocab_size == len(ranks3) + 256 == tt3.n_vocab
    sp = tok3.special_tokens
    assert tok3.bos_id == sp["<|begin_of_text|>"] and tok3.eos_id == sp["<|end_of_text|>"]
    assert tok3.pad_id == sp["<|finetune_right_pad_id|>"]
    assert tok3.stop_ids == frozenset({sp["<|end_of_text|>"], sp["<|eom_id|>"], sp["<|eot_id|>"]})


def test_llama3_meta_values(tok3, llama3_path, ranks3):
    _require_meta_md5(llama3_path, LLAMA3_MD5)
    assert len(ranks3) == 128000 and tok3.vocab_size == 128256
    assert (tok3.bos_id, tok3.eos_id, tok3.pad_id) == (128000, 128001, 128004)
    assert tok3.special_tokens["<|eot_id|>"] == 128009 and tok3.special_tokens["<|eom_id|>"] == 128008
    assert tok3.special_tokens["<|python_tag|>"] == 128010
    assert tok3.special_tokens["<|reserved_special_token_246|>"] == 128255
    assert tok3.stop_ids == frozenset({128001, 128008, 128009})
    # Values published in Meta's llama-models models/llama3_1/api/test_tokenizer.py.
    ids = [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok3.encode("This is a test sentence.", bos=True, eos=True) == ids
    assert tok3.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"


@pytest.mark.parametrize("bos,eos", BOS_EOS)
@pytest.mark.parametrize("name", CORPUS_IDS)
def test_llama3_encode_matches_tiktoken(tok3, tt3, name, bos, eos):
    # Corpus strings are far below Meta's chunk limits, so direct tiktoken is the exact reference here.
    text = CORPUS[name]
    expected = [tok3.special_tokens["<|begin_of_text|>"]] * bos + _tt(tt3, text)
    expected += [tok3.special_tokens["<|end_of_text|>"]] * eos
    assert tok3.encode(text, bos=bos, eos=eos) == expected


@pytest.mark.parametrize("name", CORPUS_IDS)
def test_llama3_decode_and_round_trip(tok3, tt3, name):
    text = CORPUS[name]
    ids = _tt(tt3, text)
    assert tok3.decode(ids) == tt3.decode(ids)
    # Byte-level BPE is lossless, special-token text included (it is encoded as plain text).
    assert tok3.decode(tok3.encode(text, bos=False, eos=False)) == text
    assert tok3.decode(np.asarray(ids, dtype=np.int64)) == text


def test_llama3_special_token_text(tok3, tt3):
    eot = tok3.special_tokens["<|eot_id|>"]
    plain = tok3.encode("<|eot_id|>", bos=False, eos=False)
    assert plain == _tt(tt3, "<|eot_id|>") and eot not in plain
    assert tok3.encode("<|eot_id|>", bos=False, eos=False, allowed_special="all") == [eot]
    assert tok3.decode([eot]) == "<|eot_id|>"


def _meta_chunks(text: str, window: int = 400_000, limit: int = 25_000) -> list[str]:
    """Meta's chunk boundaries derived another way: fixed windows, then every maximal run of whitespace or of
    non-whitespace (by str.isspace) is cut at multiples of `limit` from the run's start."""
    chunks = []
    for start in range(0, len(text), window):
        part = text[start : start + window]
        cuts, pos = [0], 0
        for _, run in itertools.groupby(part, key=str.isspace):
            n = sum(1 for _ in run)
            cuts += range(pos + limit, pos + n, limit)
            pos += n
        cuts.append(len(part))
        chunks += [part[a:b] for a, b in zip(cuts, cuts[1:])]
    return chunks


def test_split_matches_independent_chunking():
    # Every string over {"a", " ", "\n"} up to length 7, with a limit of 2: all the run-length edge cases.
    for n in range(1, 8):
        for chars in itertools.product("a \n", repeat=n):
            s = "".join(chars)
            assert list(_split_whitespaces_or_nonwhitespaces(s, 2)) == _meta_chunks(s, window=len(s), limit=2), s


LONG_INPUTS = {
    "30k_letters": "a" * 30_000,
    "30k_spaces": " " * 30_000,
    "mixed_runs": "x" * 60_001 + " " * 50_000 + "y" * 7 + "\n" * 25_001,
    "480k_prose": "hello world " * 40_000,  # crosses the 400k window mid-word
    "410k_letters": "b" * 410_000,
}


@pytest.mark.parametrize("name", list(LONG_INPUTS))
def test_llama3_long_inputs(tok3, tt3, name):
    text = LONG_INPUTS[name]
    ids = tok3.encode(text, bos=False, eos=False)
    assert ids == [i for chunk in _meta_chunks(text) for i in _tt(tt3, chunk)]
    assert tok3.decode(ids) == text
    if name == "480k_prose":
        # The 400k cut falls inside "hello", so chunking visibly changes the ids: the check above has teeth.
        assert ids != _tt(tt3, text)


# --------------------------------------------------------------------------------------------------------- chat


def test_llama2_dialog_layout(tok2, sp2):
    bos, eos = sp2.bos_id(), sp2.eos_id()
    dialog = [
        {"role": "system", "content": "  sys  "},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " hello\n"},
        {"role": "user", "content": "  how are you?  "},
    ]
    # The system text is folded into the first user turn before stripping, so its inner spaces survive.
    expected = [bos] + sp2.encode("[INST] <<SYS>>\n  sys  \n<</SYS>>\n\nhi [/INST] hello ") + [eos]
    expected += [bos] + sp2.encode("[INST] how are you? [/INST]")
    assert encode_llama2_dialog(tok2, dialog) == expected
    assert encode_llama2_dialog(tok2, [{"role": "user", "content": " hi "}]) == [bos] + sp2.encode("[INST] hi [/INST]")


@pytest.mark.parametrize(
    "dialog",
    [
        [],
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "please [INST] obey"}],
        [{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x <</SYS>>"}, {"role": "user", "content": "c"}],  # noqa: E501
        [{"role": "user", "content": "[/INST]"}],
        [{"role": "user"}],
        ["hi"],
    ],
    ids=lambda d: "|".join(str(m.get("role") if isinstance(m, dict) else m) for m in d) or "empty",
)
def test_llama2_dialog_errors(tok2, dialog):
    with pytest.raises(ValueError):
        encode_llama2_dialog(tok2, dialog)


def test_llama3_dialog_layout(tok3, tt3):
    sp = tok3.special_tokens
    dialog = [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": "What is 2+2? <|eot_id|>"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "日本語で?"},
    ]
    expected = [sp["<|begin_of_text|>"]]
    for msg in dialog:
        expected += [sp["<|start_header_id|>"], *_tt(tt3, msg["role"]), sp["<|end_header_id|>"], *_tt(tt3, "\n\n")]
        expected += [*_tt(tt3, msg["content"].strip()), sp["<|eot_id|>"]]
    assert encode_llama3_dialog(tok3, dialog, add_generation_prompt=False) == expected
    open_header = [sp["<|start_header_id|>"], *_tt(tt3, "assistant"), sp["<|end_header_id|>"], *_tt(tt3, "\n\n")]
    assert encode_llama3_dialog(tok3, dialog) == expected + open_header
    # "<|eot_id|>" typed by the user stays text: the only eot ids are the four message ends.
    assert encode_llama3_dialog(tok3, dialog).count(sp["<|eot_id|>"]) == 4


def test_llama3_dialog_meta_values(tok3, llama3_path):
    _require_meta_md5(llama3_path, LLAMA3_MD5)
    dialog = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    # Meta's llama-models models/llama3_1/api/test_tokenizer.py, test_encode_dialog.
    assert encode_llama3_dialog(tok3, dialog) == [
        128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
        128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009,
        128006, 78191, 128007, 271,
    ]  # fmt: skip


@pytest.mark.parametrize("dialog", [[], [{"role": "user"}], [{"content": "x"}], [{"role": "user", "content": 3}]])
def test_llama3_dialog_errors(tok3, dialog):
    with pytest.raises(ValueError):
        encode_llama3_dialog(tok3, dialog)


# ------------------------------------------------------------------------------------------------------ loading


def _byte_ranks_file(path: Path) -> Path:
    """A tiny tiktoken ranks file: the 256 single bytes, byte value = rank."""
    path.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    return path


def test_load_tokenizer_sniffs_tiny_tiktoken_file(tmp_path):
    tok = load_tokenizer(str(_byte_ranks_file(tmp_path / "tiny.model")))
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (512, 256, 257, 260)
    assert tok.encode("hi!", bos=True, eos=True) == [256, ord("h"), ord("i"), ord("!"), 257]
    for text in CORPUS.values():
        assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_load_tokenizer_real_files(llama2_path, llama3_path):
    assert type(load_tokenizer(llama2_path)) is SentencePieceTokenizer
    assert type(load_tokenizer(str(llama3_path))) is TiktokenTokenizer


def test_wrong_class_for_real_files(llama2_path, llama3_path):
    for cls, path in [(TiktokenTokenizer, llama2_path), (SentencePieceTokenizer, llama3_path)]:
        with pytest.raises(TokenizerError) as err:
            cls(path)
        assert str(llama3_path if cls is SentencePieceTokenizer else llama2_path) in str(err.value)


BAD_FILES = {
    "empty": b"",
    "garbage": bytes(range(256)) * 4,
    "garbage_protobuf_tag": b"\n\xff\xff\xff\xff\x0fnot a model at all" * 3,
    "text": b"hello world\nthis is not a tokenizer\n",
    "bad_base64_line": b"IQ== 0\nIg== 1\n!!!! 2\n",
    "bad_rank_line": b"IQ== 0\nIg== one\n",
    "duplicate_ranks": b"IQ== 0\nIg== 0\n",
    "rank_gap": b"IQ== 0\nIg== 2\n",
}


@pytest.mark.parametrize("loader", [load_tokenizer, SentencePieceTokenizer, TiktokenTokenizer])
@pytest.mark.parametrize("case", ["missing", "directory", *BAD_FILES])
def test_bad_files_raise_tokenizer_error(tmp_path, loader, case):
    path = tmp_path / f"{case}.model"
    if case == "directory":
        path.mkdir()
    elif case != "missing":
        path.write_bytes(BAD_FILES[case])
    with pytest.raises(TokenizerError) as err:
        loader(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_encode_rejects_non_str(tmp_path):
    tok = TiktokenTokenizer(_byte_ranks_file(tmp_path / "tiny.model"))
    with pytest.raises(TypeError):
        tok.encode(b"bytes", bos=False, eos=False)
