"""Chat fine-tuning data: `.jsonl` records of `{"messages": [{"role", "content"}, ...]}` or
`{"prompt", "completion"}`, encoded in the tokenizer's chat format with a loss mask over the assistant's tokens.

    python -m llama_jax.chat_data --pydoc-chat data/pydoc-chat.jsonl    # the demo's chat set, no download

`--pydoc-chat FILE` writes one record per CPython pydoc topic: "What does the documentation say about TOPIC?"
answered by the topic's first paragraph.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from llama_jax.chat import encode_training_dialog
from llama_jax.data import DataError, list_text_files
from llama_jax.dataset import sources


def is_chat_data(path: str | Path) -> bool:
    """Whether `path`'s first .jsonl record is a chat record (then every record must be)."""
    for file in list_text_files(path):
        if file.suffix == ".jsonl":
            with file.open("rb") as f:
                first = next((line for line in f if line.strip()), b"")
            try:
                record = json.loads(first or b"{}")
            except ValueError:
                return False
            return sources.is_chat_record(record)
    return False


def read_dialogs(path: str | Path) -> list[tuple[str, list[dict]]]:
    """(file:line, dialog) of every record under `path`; a bad record is a DataError naming its file and line."""
    out = []
    for file in list_text_files(path):
        if file.suffix != ".jsonl":
            raise DataError(f"{file}: chat data must be .jsonl records of messages (or prompt/completion)")
        unit = sources.Unit("jsonl", (str(file),), 0, file.stat().st_size)
        out.extend((str(where), parse_record(line, where)) for line, where in sources.jsonl_lines(unit))
    if not out:
        raise DataError(f"{path}: no chat records")
    return out


def parse_record(line: str | bytes, where: object) -> list[dict]:
    """The dialog of one .jsonl line; a DataError naming `where` (str() gives its file:line) if it is not one."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return record["messages"]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise DataError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"completion\": ...}}")


def encode_record(tok, dialog: list[dict], where: object) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, loss mask bool) of one dialog in the tokenizer's chat format; a dialog the format refuses, or
    one that trains on nothing, is a DataError naming `where`."""
    try:
        ids, mask = encode_training_dialog(tok, dialog)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if not any(mask):
        raise DataError(f"{where}: no assistant message, so nothing to train on")
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def encode_dialogs(tok, dialogs: list[tuple[str, list[dict]]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(ids, loss mask) per record; a record that trains on nothing is a DataError naming its file and line."""
    encoded = [encode_record(tok, dialog, where) for where, dialog in dialogs]
    return [ids for ids, _ in encoded], [mask for _, mask in encoded]


def pydoc_chat() -> list[dict]:
    """A question per pydoc topic, answered by the topic's first paragraph (at most 400 characters)."""
    from llama_jax.data import pydoc_topics

    records = []
    for name, text in pydoc_topics().items():
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip() and not set(p.strip()) <= set("*=-")]
        if paragraphs:
            answer = " ".join(paragraphs[min(1, len(paragraphs) - 1)].split())[:400]
            records.append({"messages": [{"role": "user", "content": f"What does the documentation say about {name}?"},
                                         {"role": "assistant", "content": answer}]})
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_jax.chat_data", description=__doc__.split("\n")[0])
    p.add_argument("--pydoc-chat", required=True, metavar="FILE", help="write the pydoc chat set here (.jsonl)")
    args = p.parse_args(argv)
    path = Path(args.pydoc_chat)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = pydoc_chat()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {len(records)} chat records to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
