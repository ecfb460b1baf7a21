"""Chat: Meta's Llama 2 and Llama 3 dialog formats, and the helpers that generation and serving build on them.

Behaviour follows Meta's reference code (llama/generation.py `chat_completion` for Llama 2, llama3's
`ChatFormat` for Llama 3), so prompt ids match Meta's exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from llama_jax.tokenizer import Message, TiktokenTokenizer, Tokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


def _check_messages(dialog: Sequence[Message]) -> None:
    if not dialog:
        raise ValueError("dialog is empty")
    for i, msg in enumerate(dialog):
        if not (isinstance(msg, Mapping) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise ValueError(f"message {i} must be a dict with str 'role' and 'content', got {msg!r}")


def _llama2_turns(dialog: Sequence[Message], *, ending: str | None) -> list[Message]:
    """The dialog as Meta's Llama 2 code sees it: a system message folded into the first user message, then
    user and assistant alternating, ending with `ending` (None: either)."""
    _check_messages(dialog)
    # Meta answers such requests with an error text instead of generating; refusing to encode is the equivalent.
    for i, msg in enumerate(dialog):
        tags = [tag for tag in LLAMA2_SPECIAL_TAGS if tag in msg["content"]]
        if tags:
            raise ValueError(f"message {i} contains Llama 2 special tags {tags}, which are not allowed in prompts")
    given_roles = [msg["role"] for msg in dialog]
    if dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise ValueError("a system message must be followed by a user message")
        first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first, *dialog[2:]]
    roles = [msg["role"] for msg in dialog]
    if (any(r != "user" for r in roles[::2]) or any(r != "assistant" for r in roles[1::2])
            or (ending is not None and roles[-1] != ending)):
        raise ValueError(
            "Llama 2 chat supports an optional 'system' message, then 'user' and 'assistant' alternating"
            f"{f' and ending with {ending!r}' if ending else ''}; got roles {given_roles}"
        )
    return list(dialog)


def _llama2_prompt(msg: Message) -> str:
    return f"{B_INST} {msg['content'].strip()} {E_INST}"


def encode_llama2_dialog(tok: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """Prompt ids for a Llama 2 chat model, as Meta's `Llama.chat_completion` builds them.

    Roles: an optional first "system", then "user"/"assistant" alternating, ending with "user".
    """
    turns = _llama2_turns(dialog, ending="user")
    ids: list[int] = []
    for prompt, answer in zip(turns[::2], turns[1::2]):
        ids += tok.encode(f"{_llama2_prompt(prompt)} {answer['content'].strip()} ", bos=True, eos=True)
    return ids + tok.encode(_llama2_prompt(turns[-1]), bos=True, eos=False)


def _llama3_header(tok: TiktokenTokenizer, role: str) -> list[int]:
    return [
        tok.special_tokens["<|start_header_id|>"],
        *tok.encode(role, bos=False, eos=False),
        tok.special_tokens["<|end_header_id|>"],
        *tok.encode("\n\n", bos=False, eos=False),
    ]


def encode_llama3_dialog(
    tok: TiktokenTokenizer, dialog: Sequence[Message], add_generation_prompt: bool = True
) -> list[int]:
    """Prompt ids for a Llama 3 chat model, as Meta's `ChatFormat.encode_dialog_prompt` builds them.

    With `add_generation_prompt` (Meta always adds it) the ids end with an open assistant header for the model
    to complete; without it they end after the last message's <|eot_id|> (for scoring or training).
    Special-token text inside content is encoded as plain text.
    """
    ids = [i for piece, _ in _llama3_pieces(tok, dialog) for i in piece]
    return ids + _llama3_header(tok, "assistant") if add_generation_prompt else ids


def _llama3_pieces(tok: TiktokenTokenizer, dialog: Sequence[Message]):
    """(ids, whether an assistant wrote them) for bos, then each message's header, content and <|eot_id|>."""
    _check_messages(dialog)
    yield [tok.bos_id], False
    for msg in dialog:
        yield _llama3_header(tok, msg["role"]), False
        yield tok.encode(msg["content"].strip(), bos=False, eos=False) + [tok.eot_id], msg["role"] == "assistant"


def encode_training_dialog(tok: Tokenizer, dialog: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """A whole dialog in the tokenizer's chat format, for training: its ids and which of them the loss covers.

    The loss covers each assistant message and the token that closes it (<|eot_id|> for Llama 3, eos for Llama 2);
    system and user messages and the format's own headers are masked. The dialog may end with either role.
    Llama 2 encodes an exchange as one text, `[INST] prompt [/INST] answer `, as Meta does, so the answer starts
    where SentencePiece's pieces do: the loss covers the pieces that begin at or after the space that opens the
    answer; a piece that straddles the end of `[/INST]` (it can merge `]` with what follows) stays prompt-side.
    """
    if isinstance(tok, TiktokenTokenizer):
        pieces = list(_llama3_pieces(tok, dialog))
        return ([i for ids, _ in pieces for i in ids], [m for ids, m in pieces for _ in ids])
    turns = _llama2_turns(dialog, ending=None)
    ids: list[int] = []
    mask: list[bool] = []
    for prompt, answer in zip(turns[::2], turns[1::2]):
        prefix = _llama2_prompt(prompt)
        boundary = len(prefix.encode("utf-8"))
        pieces = _sentencepiece_spans(tok, f"{prefix} {answer['content'].strip()} ")
        ids += [tok.bos_id, *(piece_id for piece_id, _ in pieces), tok.eos_id]
        mask += [False, *(begin >= boundary for _, begin in pieces), True]
    if len(turns) % 2:
        tail = tok.encode(_llama2_prompt(turns[-1]), bos=True, eos=False)
        ids, mask = ids + tail, mask + [False] * len(tail)
    return ids, mask


def _sentencepiece_spans(tok, text: str) -> list[tuple[int, int]]:
    """(id, byte offset where the piece begins) of each piece of `text`: the ids `tok.encode` gives."""
    try:
        proto = tok.sp.encode(text, return_type="proto")
    except TypeError:  # sentencepiece releases before `return_type`
        proto = tok.sp.encode(text, out_type="immutable_proto")
    return [(p.id, p.begin) for p in proto.pieces]


def encode_chat(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """Prompt ids of a dialog in the tokenizer's chat format: Llama 3 for tiktoken, Llama 2 otherwise."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return encode_llama3_dialog(tokenizer, dialog)
    return encode_llama2_dialog(tokenizer, dialog)


def fit_dialog(tokenizer: Tokenizer, dialog: list[dict], max_len: int) -> tuple[list[dict], list[int]]:
    """Drops the oldest user/assistant exchanges (never the system message nor the last user turn) until the
    encoded dialog is shorter than max_len; returns the kept dialog and its ids (possibly still too long)."""
    dialog = list(dialog)
    ids = encode_chat(tokenizer, dialog)
    head = 1 if dialog and dialog[0]["role"] == "system" else 0
    while len(ids) >= max_len and len(dialog) - head > 1:
        del dialog[head:head + 2]
        ids = encode_chat(tokenizer, dialog)
    return dialog, ids


class IncrementalDecoder:
    """Turns a growing id sequence into text deltas for streaming, in time linear in its length.

    Each push decodes a short window: the ids since the start of the previous delta. SentencePiece drops a word's
    leading space when pieces are decoded one by one, so the window's text is compared with its already-sent
    prefix decoded the same way, and the difference is the delta. A trailing U+FFFD means a multi-byte character
    is still incomplete: it is held back until the next ids complete it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # the window's first id
        self.sent = 0  # ids before this one are in the deltas returned so far
        self.text = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        window = self.ids[self.start:]
        before = self.tokenizer.decode(window[:self.sent - self.start])
        text = self.tokenizer.decode(window)
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        delta = text[len(before):]
        self.start, self.sent = self.sent, len(self.ids)
        self.text += delta
        return delta
