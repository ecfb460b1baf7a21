"""Trains a Llama-2-style SentencePiece tokenizer on a text file or folder.

    python -m llama_jax.train_tokenizer --input corpus/ --output tok.model --vocab-size 2000
    python -m llama_jax.train_tokenizer --pydoc-topics data/pydoc --output data/pydoc.model

`--pydoc-topics DIR` first writes the reference-manual topics that ship with CPython into DIR (one .txt per
topic) and trains on them: the corpus of the no-download demo.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

from llama_jax.data import DataError, read_documents, write_pydoc_topics

# Llama 2's trainer settings (read from its tokenizer.model's trainer_spec) minus the corpus-size ones:
# BPE, byte fallback so every string encodes, digits split, whitespace kept as is, unk/bos/eos = 0/1/2, no pad.
LLAMA2_SPEC = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    character_coverage=0.99995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=16384,
)


def train_tokenizer(docs: list[str], output: str | Path, vocab_size: int = 2000, seed_sentences: int = 2_000_000,
                    num_threads: int | None = None) -> Path:
    """Writes a SentencePiece model trained on `docs` to `output` (atomically) and returns its path."""
    if vocab_size < 300:  # 256 byte pieces + unk/bos/eos + a few merges
        raise ValueError(f"--vocab-size={vocab_size}: must be at least 300 (256 byte-fallback pieces are reserved)")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # SentencePiece trains on lines; newlines themselves are encoded through byte fallback (as in Llama 2).
    lines = (line for doc in docs for line in doc.splitlines() if line.strip())
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, vocab_size=vocab_size,
        input_sentence_size=seed_sentences, shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=2, **LLAMA2_SPEC)
    with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", delete=False) as tmp:
        tmp.write(model.getvalue())
    os.replace(tmp.name, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.train_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a text file or a folder of .txt/.md/.rst/.jsonl files")
    src.add_argument("--pydoc-topics", metavar="DIR", help="write CPython's pydoc topics into DIR and train on them")
    parser.add_argument("--output", required=True, help="where to write the tokenizer (.model)")
    parser.add_argument("--vocab-size", type=int, default=2000, help="number of pieces (default: 2000)")
    args = parser.parse_args(argv)
    try:
        if args.pydoc_topics:
            written = write_pydoc_topics(args.pydoc_topics)
            print(f"wrote {len(written)} pydoc topics to {args.pydoc_topics}")
        docs = read_documents(args.input or args.pydoc_topics)
        path = train_tokenizer(docs, args.output, args.vocab_size)
    except (DataError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.vocab_size} pieces, trained on {len(docs)} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
