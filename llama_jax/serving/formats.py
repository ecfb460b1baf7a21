"""The OpenAI response shapes built from the engine's updates: choices, usage, and log-probabilities in the
completions format (tokens, token_logprobs, top_logprobs, text_offset) and in the chat format (content)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from llama_jax.inference.requests import TokenLogprob


def envelope(kind: str, model: str, rid: str, choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
    body = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class CompletionLogprobs:
    """Accumulates the completions format over a choice's updates; `text_offset` continues from `offset`."""

    def __init__(self, tokenizer, offset: int):
        self.tokenizer, self.offset = tokenizer, offset

    def add(self, entries: Sequence[TokenLogprob | None], ids: Sequence[int]) -> dict[str, list]:
        """The format for tokens `ids` with their entries (None: a token without a log-probability, the prompt's
        first)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in zip(ids, entries):
            text = self.tokenizer.decode([token])
            out["tokens"].append(text)
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            out["top_logprobs"].append(None if entry is None else
                                       {self.tokenizer.decode([t]): lp for t, lp in entry.top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge_logprobs(parts: list[dict[str, list]]) -> dict[str, list] | None:
    if not parts:
        return None
    return {key: [v for p in parts for v in p[key]] for key in parts[0]}


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> dict[str, list]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_choice(index: int, text: str, logprobs, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, logprobs, finish_reason: str | None, *, delta: bool,
                first: bool = False) -> dict[str, Any]:
    message = {"role": "assistant", "content": text} if not delta else (
        {"role": "assistant", "content": text} if first else ({"content": text} if text else {}))
    return {"index": index, "delta" if delta else "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}
