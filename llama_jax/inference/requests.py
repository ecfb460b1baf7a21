"""A request to the batching engine, as the engine's thread sees it: settings, the text it has produced so far
(with stop strings cut out, including strings that span tokens), and the updates it sends to its caller."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Sequence

from llama_jax.chat import IncrementalDecoder
from llama_jax.sampling import MAX_TOP_LOGPROBS, SamplingParams


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """What one request asks for: the settings of the OpenAI API that reach the engine."""

    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a fresh random seed
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best candidates
    prompt_logprobs: bool = False  # the same for the prompt's tokens (the first has none)

    def __post_init__(self):
        if int(self.max_tokens) != self.max_tokens or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)  # raises SamplingError
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop strings must be non-empty strings")


class RequestError(ValueError):
    """A request the engine cannot serve (prompt too long, a setting out of range); the message says which."""


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob) best first


@dataclasses.dataclass
class Update:
    """What a request produced since its previous update. The last one has `finish_reason` ("stop", "length")
    or `error` set."""

    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # in the first update, when asked for
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Request:
    """One prompt's generation. `on_update` is called from the engine's thread (keep it short and thread-safe)."""

    def __init__(self, prompt: Sequence[int], params: RequestParams, on_update: Callable[[Update], None],
                 tokenizer=None, stop_ids: frozenset[int] = frozenset()):
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(31)
        self.on_update = on_update
        self.stop_ids = stop_ids
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.cancelled = threading.Event()
        self.generated: list[int] = []
        self.filled = 0  # prompt tokens written to the cache
        self.text = ""  # text produced so far, before stop strings were looked for
        self.sent = 0  # characters of `text` already sent
        self.finished = False
        self.pending = Update()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        """The caller has gone: the engine frees the request's slot at its next step."""
        self.cancelled.set()

    # -- called by the engine's thread

    def add_prompt_logprobs(self, logprobs: list[TokenLogprob | None]) -> None:
        self.pending.prompt_logprobs = (self.pending.prompt_logprobs or []) + logprobs

    def add_token(self, token: TokenLogprob, limit: int) -> None:
        """Records a sampled token; finishes the request on a stop id, a stop string or `limit` tokens."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.generated.append(token.id)
        if token.id in self.stop_ids:
            return self._finish("stop")
        self.pending.tokens.append(token.id)
        if self.params.logprobs is not None:
            self.pending.logprobs.append(token)
        if self.decoder is not None:
            self.text += self.decoder.push([token.id])
            if self._cut_at_stop_string():
                return self._finish("stop")
        if len(self.generated) >= limit:
            return self._finish("length")

    def _cut_at_stop_string(self) -> bool:
        """Cuts `text` before the first stop string; True when one was found."""
        stops = self.params.stop
        if not stops:
            return False
        start = max(0, self.sent - max(len(s) for s in stops) + 1)  # a new match ends in unsent text
        found = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
        return bool(found)

    def _held_back(self) -> int:
        """How many trailing characters could begin a stop string, and must wait for the next tokens."""
        for n in range(min(len(self.text) - self.sent, max((len(s) for s in self.params.stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.params.stop):
                return n
        return 0

    def _finish(self, reason: str) -> None:
        self.pending.finish_reason = reason
        self.finished = True

    def flush(self) -> None:
        """Sends what is pending (if anything is, or the request ended)."""
        update = self.pending
        end = len(self.text) - (0 if update.final else self._held_back())
        update.text, self.sent = self.text[self.sent:end], max(self.sent, end)
        if not (update.text or update.tokens or update.final or update.prompt_logprobs):
            return
        update.prompt_tokens, update.completion_tokens = len(self.prompt), len(self.generated)
        self.pending = Update()
        self.on_update(update)

    def fail(self, message: str) -> None:
        self.finished = True
        self.pending.error = message
        self.flush()
