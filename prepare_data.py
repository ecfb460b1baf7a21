#!/usr/bin/env python
"""Tokenise a corpus once into a prepared dataset folder that train.py --data reads from disk.

Examples:
  python prepare_data.py --input corpus/ --tokenizer models/llama3.2-1b/tokenizer.model --output data/corpus
  python prepare_data.py --input 'crawl/*.jsonl.zst' --text-field content --tokenizer tok.model --output data/crawl
  python prepare_data.py --chat --input 'chats/*.jsonl.gz' --tokenizer tok.model --output data/chats
  python prepare_data.py ... --resume      # after an interruption: finished shards are kept

Inputs: text files (.txt .md .rst .text), .jsonl (one document per line's "text" field), either compressed with
.gz or .zst, and Parquet (a "text" column; needs pyarrow); folders are searched for all of these; globs are
expanded. Each document is tokenised as bos ... eos. The folder holds flat token shards (uint16 when the
vocabulary fits, else uint32), document offsets, and manifest.json (tokenizer md5, counts, sources).

--chat: every input is .jsonl (.gz/.zst allowed) of chat records, {"messages": [{"role", "content"}, ...]} or
{"prompt", "completion"}, each encoded in the tokenizer's chat format exactly as train.py encodes a chat .jsonl,
with a per-token loss mask (.mask shards) over the assistant's tokens.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="prepare_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, folders or globs")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model (SentencePiece or tiktoken)")
    p.add_argument("--output", required=True, metavar="DATASET_DIR", help="the dataset folder to write")
    p.add_argument("--workers", type=int, help="tokenising processes (default: all cores)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: keep finished shards")
    p.add_argument("--text-field", default="text", help='the .jsonl field / Parquet column of the text (default: "text")')
    p.add_argument("--chat", action="store_true",
                   help="the inputs are .jsonl chat records (messages or prompt/completion): loss on the assistant's "
                        "tokens only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers={args.workers}: must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llama_jax.data import DataError
    from llama_jax.dataset.prepare import prepare_dataset
    from llama_jax.tokenizer import TokenizerError

    try:
        prepare_dataset(args.input, args.tokenizer, args.output, workers=args.workers, resume=args.resume,
                        text_field=args.text_field, chat=args.chat, progress=not args.no_progress,
                        log=lambda line: print(line, file=sys.stderr))
    except (DataError, TokenizerError) as e:
        lines = str(e).strip().splitlines()
        print(f"error: {lines[0] if lines else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
