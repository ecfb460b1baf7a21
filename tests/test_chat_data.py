"""Chat fine-tuning data through the training loader: each record's loss mask covers its assistant tokens only,
as the chat encoder (itself checked against Meta's layouts in test_chat.py) marks them; bad records name their line."""

import json
from pathlib import Path

import numpy as np
import pytest

from llama_jax import train as T
from llama_jax.chat import encode_training_dialog
from llama_jax.data import DataError
from llama_jax.tokenizer import load_tokenizer

LLAMA3 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "llama3" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not LLAMA3.is_file(), reason=f"real Llama 3 tokenizer not found at {LLAMA3}")

RECORDS = [
    {"messages": [{"role": "system", "content": "Answer in one line."},
                  {"role": "user", "content": "What does the with statement do?"},
                  {"role": "assistant", "content": "It runs a block inside a context manager."}]},
    {"prompt": "What is 2+2?", "completion": "4"},
    {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"},
                  {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "11, of course."}]},
]


def _load(tmp_path, records):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tc = T.TrainConfig(run_dir=str(tmp_path / "run"), data=str(tmp_path / "chat.jsonl"), tokenizer=str(LLAMA3),
                       seq_len=16)
    return T.load_data(tc, LLAMA3)


def test_loss_mask_covers_each_records_assistant_tokens(tmp_path):
    train, held_out = _load(tmp_path, RECORDS)
    rows = [part.gather(np.arange(len(part))) for part in (train, held_out) if part is not None]
    all_rows = np.concatenate([r["rows"] for r in rows])
    all_mask = np.concatenate([r["loss_mask"] for r in rows])
    tok = load_tokenizer(LLAMA3)
    dialogs = [r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]},
                                                      {"role": "assistant", "content": r["completion"]}]
               for r in RECORDS]
    expected_targets = sum(sum(encode_training_dialog(tok, d)[1]) for d in dialogs)
    assert int(all_mask.sum()) == expected_targets  # every assistant token, nothing else
    # Each counted target is an assistant token: its id appears in some record's masked ids.
    masked_ids = {i for d in dialogs for i, m in zip(*encode_training_dialog(tok, d)) if m}
    assert set(all_rows[:, 1:][all_mask].tolist()) <= masked_ids
    assert tok.eot_id in set(all_rows[:, 1:][all_mask].tolist())  # each answer's closing <|eot_id|> is trained on


def test_a_record_without_an_answer_names_its_line(tmp_path):
    records = [RECORDS[0], {"messages": [{"role": "user", "content": "Hello?"}]}]
    with pytest.raises(DataError, match=r"chat.jsonl:2: no assistant message"):
        _load(tmp_path, records)
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[1]) + "\n" + '{"messages": 3}\n')
    tc = T.TrainConfig(run_dir=str(tmp_path / "r"), data=str(tmp_path / "bad.jsonl"), tokenizer=str(LLAMA3))
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected"):
        T.load_data(tc, LLAMA3)
