"""Tokenizers for LLaMA 2 (SentencePiece) and LLaMA 3 (tiktoken BPE) behind one interface (chat formats: chat.py).

Behaviour follows Meta's reference code (llama/tokenizer.py for Llama 2; llama-models
models/llama3_1/api/tokenizer.py for Llama 3), so token ids match Meta's exactly.
"""

from __future__ import annotations

import abc
import base64
import binascii
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import AbstractSet, Collection, Literal

import sentencepiece
import tiktoken

__all__ = [
    "Message",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "load_tokenizer",
]

Message = Mapping[str, str]  # {"role": "system" | "user" | "assistant" | ..., "content": "..."}


class TokenizerError(ValueError):
    """A tokenizer file that cannot be loaded; the one-line message names the path and what was expected."""


class Tokenizer(abc.ABC):
    """What the rest of llama_jax needs from a tokenizer."""

    path: Path
    bos_id: int
    eos_id: int
    pad_id: int  # always a valid id (>= 0): it gets written into id arrays and used as an embedding index
    stop_ids: frozenset[int]  # generation ends at any of these
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of `text`, optionally with the bos id prepended and the eos id appended."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (any sequence of ints: list, tuple, numpy array)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


def _read(path: Path, expected: str, limit: int = -1) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such file; expected {expected}") from None
    except OSError as err:
        raise TokenizerError(f"{path}: cannot read ({err.strerror or err}); expected {expected}") from None
    if not data:
        raise TokenizerError(f"{path}: file is empty; expected {expected}")
    return data


def _check_str(text: object) -> None:
    # Both libraries accept odd inputs (bytes, lists) and do surprising things with them; Meta asserts str.
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")


# ----------------------------------------------------------------------------------------------------------- Llama 2

_SP_EXPECTED = "a SentencePiece model (Llama 2 tokenizer.model)"


class SentencePieceTokenizer(Tokenizer):
    """Llama 2 tokenizer: a SentencePiece model (32000 pieces, bos 1, eos 2, byte fallback)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = _read(self.path, _SP_EXPECTED)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except Exception:  # the library only offers a RuntimeError quoting its C++ source line
            raise TokenizerError(f"{self.path}: does not parse as {_SP_EXPECTED}") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.vocab_size <= 0 or not (0 <= self.bos_id < self.vocab_size and 0 <= self.eos_id < self.vocab_size):
            raise TokenizerError(f"{self.path}: not {_SP_EXPECTED}: it defines no usable bos/eos pieces")
        # Meta's model reports pad -1 ("no pad piece"). -1 cannot index an embedding table or live in a uint
        # array, so pad with unk (0): padded positions are masked out anyway, any valid id will do.
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else max(self.sp.unk_id(), 0)
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        _check_str(text)
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        # SentencePiece drops control pieces (bos/eos) and the dummy-prefix space of the first piece, so
        # decoding one token at a time loses word-initial spaces: decode whole sequences when streaming.
        return self.sp.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------------------------------------- Llama 3

_TIKTOKEN_EXPECTED = "a tiktoken BPE ranks file (Llama 3 tokenizer.model: lines of 'base64-token rank')"

# Meta's pre-tokenisation regex for Llama 3.
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

# Llama 3.1's 256 special tokens in Meta's order (llama-models models/llama3_1/api/tokenizer.py); they get the ids
# right after the BPE ranks, 128000..128255. Llama 3 / 3.2 text models use the same ids for the named ones.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
)
NUM_SPECIAL_TOKENS = 256
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)

# tiktoken panics on inputs much longer than this.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# Long runs of (non-)whitespace make tiktoken's BPE slow or crash (openai/tiktoken#195); Meta cuts them here.
MAX_NO_WHITESPACES_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Meta's splitter: slices of `s` with no run of whitespace or non-whitespace longer than the limit."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+=*\s+[0-9]+\s*")


def _parse_bpe_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    # Same format as tiktoken.load.load_tiktoken_bpe, parsed here because that function caches file contents in
    # $TMPDIR/data-gym-cache keyed by the *path string*: a changed file, or another "tokenizer.model" given by
    # the same relative path, would silently load stale ranks.
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        if not _RANK_LINE.fullmatch(line):
            raise TokenizerError(f"{path}: line {lineno} is not 'base64-token rank'; expected {_TIKTOKEN_EXPECTED}")
        token, rank = line.split()
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except binascii.Error:
            raise TokenizerError(f"{path}: line {lineno} has bad base64; expected {_TIKTOKEN_EXPECTED}") from None
    if not ranks:
        raise TokenizerError(f"{path}: no ranks found; expected {_TIKTOKEN_EXPECTED}")
    # Special tokens are numbered from len(ranks), which is only right when the ranks are exactly 0..n-1.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not unique tokens numbered 0..{len(ranks) - 1}")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3 tokenizer: tiktoken BPE over Meta's 128000 ranks plus 256 special tokens."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        ranks = _parse_bpe_ranks(self.path, _read(self.path, _TIKTOKEN_EXPECTED))
        self.special_tokens: dict[str, int] = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(
            name=self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = len(ranks) + len(SPECIAL_TOKENS)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        # Base models end with <|end_of_text|>; instruct models end a turn with <|eot_id|> or <|eom_id|>.
        self.stop_ids = frozenset({self.eos_id, self.eom_id, self.eot_id})

    def encode(
        self,
        text: str,
        bos: bool,
        eos: bool,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `text`. By default special-token text such as "<|eot_id|>" is encoded as plain text
        (so user content cannot inject control tokens); pass allowed_special="all" to get the special ids."""
        _check_str(text)
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_whitespaces_or_nonwhitespaces(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                              MAX_NO_WHITESPACES_CHARS):
                ids.extend(self.model.encode(piece, allowed_special=allowed_special,
                                             disallowed_special=disallowed_special))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        # Special ids decode to their text ("<|eot_id|>"); a cut in the middle of a UTF-8 sequence becomes U+FFFD.
        return self.model.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored at `path`, Llama 2 or Llama 3, recognised from the file's contents."""
    path = Path(path)
    expected = f"{_SP_EXPECTED} or {_TIKTOKEN_EXPECTED}"
    head = _read(path, expected, limit=256)
    # A SentencePiece ModelProto serialises its repeated `pieces` (field 1, length-delimited) first: tag 0x0A.
    if head.startswith(b"\n"):
        return SentencePieceTokenizer(path)
    if _RANK_LINE.fullmatch(head.split(b"\n", 1)[0]):
        return TiktokenTokenizer(path)
    raise TokenizerError(f"{path}: unrecognised contents; expected {expected}")
