"""The chat training encoder: which tokens the loss covers, checked against spans found independently in the
documented layouts (Meta's published Llama 3 dialog ids; Llama 2's `[INST] prompt [/INST] answer </s>`)."""

from pathlib import Path

import pytest
import sentencepiece

from llama_jax.chat import encode_llama2_dialog, encode_llama3_dialog, encode_training_dialog
from llama_jax.tokenizer import load_tokenizer

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
LLAMA2, LLAMA3 = TOKENIZERS / "llama2" / "tokenizer.model", TOKENIZERS / "llama3" / "tokenizer.model"
needs_tokenizers = pytest.mark.skipif(not (LLAMA2.is_file() and LLAMA3.is_file()),
                                      reason=f"real Meta tokenizers not found in {TOKENIZERS}")
START_HEADER, END_HEADER, EOT, ASSISTANT, NEWLINES = 128006, 128007, 128009, 78191, 271

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What does the with statement do?"},
    {"role": "assistant", "content": "It wraps a block in a context manager's __enter__ and __exit__."},
    {"role": "user", "content": "And 2+2? 日本語で"},
    {"role": "assistant", "content": " 四 (4), of course.\n"},
]


def _llama3_assistant_spans(ids: list[int]) -> list[bool]:
    """True from after each `<|start_header_id|>assistant<|end_header_id|>\\n\\n` through the next <|eot_id|>."""
    mask, inside = [], False
    for j, t in enumerate(ids):
        mask.append(inside)
        if ids[j - 3:j + 1] == [START_HEADER, ASSISTANT, END_HEADER, NEWLINES]:
            inside = True
        elif t == EOT:
            inside = False
    return mask


@needs_tokenizers
def test_llama3_mask_covers_assistant_content_and_its_eot():
    tok = load_tokenizer(LLAMA3)
    # Meta's published ids (llama-models test_tokenizer.py) with an assistant answer appended as the format says.
    published = [128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                 128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009]
    dialog = [{"role": "system", "content": "This is a test sentence."},
              {"role": "user", "content": "This is a response."}, {"role": "assistant", "content": "This is a test."}]
    ids, mask = encode_training_dialog(tok, dialog)
    assert ids[:len(published)] == published
    assert ids[len(published):] == [START_HEADER, ASSISTANT, END_HEADER, NEWLINES, 2028, 374, 264, 1296, 13, EOT]
    assert mask == _llama3_assistant_spans(ids) and sum(mask) == 6
    ids, mask = encode_training_dialog(tok, DIALOG)
    assert ids == encode_llama3_dialog(tok, DIALOG, add_generation_prompt=False)
    assert mask == _llama3_assistant_spans(ids)
    assert [tok.decode([i for i, m in zip(ids, mask) if m and i != EOT])] == [
        "It wraps a block in a context manager's __enter__ and __exit__.四 (4), of course."]


@needs_tokenizers
def test_llama2_mask_covers_each_answer_and_its_eos():
    tok, sp = load_tokenizer(LLAMA2), sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2))
    ids, mask = encode_training_dialog(tok, DIALOG)
    # The documented layout, built here with sentencepiece itself: one `[INST] ... [/INST] answer ` per exchange.
    exchanges = [("<<SYS>>\nBe brief.\n<</SYS>>\n\nWhat does the with statement do?", DIALOG[2]["content"]),
                 ("And 2+2? 日本語で", DIALOG[4]["content"].strip())]
    expected_ids, expected_answers = [], []
    for prompt, answer in exchanges:
        expected_ids += [sp.bos_id(), *sp.encode(f"[INST] {prompt} [/INST] {answer} "), sp.eos_id()]
        expected_answers.append(answer)
    assert ids == expected_ids
    # The masked runs: each ends with eos and decodes to its answer; the rest decodes to the prompts.
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs.append(current)
    assert [r[-1] for r in runs] == [sp.eos_id()] * 2
    assert [sp.decode(r[:-1]).strip() for r in runs] == expected_answers
    prompts = sp.decode([i for i, m in zip(ids, mask) if not m]).split("[/INST]")
    assert [p.strip() for p in prompts] == [f"[INST] {prompt}" for prompt, _ in exchanges] + [""]
    # A dialog that ends with a user turn trains on the answers before it; its tail is Meta's prompt.
    ids, mask = encode_training_dialog(tok, DIALOG[:4])
    assert ids == encode_llama2_dialog(tok, DIALOG[:4]) and sum(mask) == len(runs[0])


@needs_tokenizers
def test_a_dialog_without_an_answer_trains_on_nothing():
    for path in (LLAMA2, LLAMA3):
        _, mask = encode_training_dialog(load_tokenizer(path), DIALOG[:2])
        assert not any(mask)
