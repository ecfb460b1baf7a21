"""Our tokenizer.model -> Hugging Face's tokenizer.json + tokenizer_config.json, with our chat layout as template.

The fast tokenizer is built from the same file our tokenizers read and gives the same ids: Llama 3's tiktoken ranks
through transformers' TikTokenConverter (Meta's regex, merges recovered from the ranks, the 256 special tokens
numbered after them), Llama 2's SentencePiece model through transformers' SentencePiece builder, which follows the
model's own normaliser settings. tokenizer_class is PreTrainedTokenizerFast, so transformers uses tokenizer.json as
written (its LlamaTokenizer class rebuilds the pre-tokenizer and loses SentencePiece's handling of leading spaces).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

from llama_jax.convert.errors import ConvertError
from llama_jax.tokenizer import PAT_STR, SPECIAL_TOKENS, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer

# encode_llama3_dialog: bos, then per message a header, the stripped content and <|eot_id|>; an open assistant
# header with add_generation_prompt.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# encode_llama2_dialog: an optional system message folded into the first user turn; each exchange is
# bos [INST] user [/INST] answer eos, and the last user turn bos [INST] user [/INST].
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Llama 2 chat expects an optional system message, then user and assistant alternating') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- set content = (system if loop.first else '') + message['content'] %}"
    "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _import_tokenizers():
    try:
        import tokenizers

        # The module, not transformers' top-level function of the same name that `import ... as` can return.
        slow = importlib.import_module("transformers.convert_slow_tokenizer")
    except ImportError:  # pragma: no cover - depends on the install
        raise ConvertError("--to-hf needs transformers: pip install 'llama_jax[convert]'") from None
    return tokenizers, slow


def _tiktoken_fast(tok: TiktokenTokenizer):
    tokenizers, slow = _import_tokenizers()
    # Ranks come from the encoding we already loaded: tiktoken's own loader caches files by path string.
    ranks = {token: tok.model.encode_single_token(token) for token in tok.model.token_byte_values()}

    class FromRanks(slow.TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url):
            return ranks

    fast = FromRanks(vocab_file=str(tok.path), pattern=PAT_STR, extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    bos = SPECIAL_TOKENS[0]
    fast.post_processor = tokenizers.processors.Sequence([
        tokenizers.processors.ByteLevel(trim_offsets=False),
        tokenizers.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.bos_id)])])
    return fast


def _sentencepiece_fast(tok: SentencePieceTokenizer):
    tokenizers, slow = _import_tokenizers()
    build = getattr(slow.SpmConverter, "build_tokenizer_from_spm_proto", None)
    if build is None:  # pragma: no cover - depends on the install
        raise ConvertError("--to-hf needs a transformers release with SpmConverter.build_tokenizer_from_spm_proto")
    sp = tok.sp
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    fast = build(slow.SentencePieceExtractor(str(tok.path)).proto, vocab, legacy=True)
    # Control pieces (<s>, </s>) and <unk> are matched as whole tokens, as in a chat template's bos_token.
    fast.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), normalized=False, special=True)
                             for i in range(sp.vocab_size()) if sp.is_control(i) or sp.is_unknown(i)])
    bos = sp.id_to_piece(tok.bos_id)
    fast.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return fast


def write_hf_tokenizer(tok: Tokenizer, folder: Path, max_len: int) -> None:
    """Writes tokenizer.json, tokenizer_config.json and the tokenizer file itself (Llama 3's in original/) into
    `folder`."""
    # The original file travels along, where Meta's HF repositories keep it, so the folder imports back as is.
    if isinstance(tok, TiktokenTokenizer):
        fast, template, copy = _tiktoken_fast(tok), LLAMA3_CHAT_TEMPLATE, folder / "original" / "tokenizer.model"
    else:
        fast, template, copy = _sentencepiece_fast(tok), LLAMA2_CHAT_TEMPLATE, folder / "tokenizer.model"
    copy.parent.mkdir(exist_ok=True)
    shutil.copyfile(tok.path, copy)
    fast.save(str(folder / "tokenizer.json"))
    piece = fast.id_to_token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": piece(tok.bos_id),
              "eos_token": piece(tok.eos_id), "pad_token": piece(tok.pad_id), "model_max_length": max_len,
              # True would rewrite " ." to "." and the like when decoding; our decode returns the text as it was.
              "clean_up_tokenization_spaces": False, "chat_template": template}
    if isinstance(tok, SentencePieceTokenizer):
        config["unk_token"] = piece(tok.sp.unk_id())
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
