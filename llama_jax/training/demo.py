"""The no-download demo as one command: the pydoc corpus and its tokenizer, then a greedy sample of the result.

Paths are relative to the current folder, as in the README's step-by-step commands, which this reproduces.
"""

from __future__ import annotations

from pathlib import Path

from llama_jax.training.config import DEMO_TRAIN

DEMO_CORPUS = "data/pydoc"
DEMO_TOKENIZER = "data/pydoc.model"
DEMO_RUN_DIR = "runs/demo"
DEMO_PROMPT = 'The "with" statement'
DEMO_SAMPLE_TOKENS = 80


def demo_warmup(steps: int) -> int:
    """The demo preset's warmup, or the same share of a run too short to hold it (--warmup must be < --steps)."""
    warmup = DEMO_TRAIN["warmup_steps"]
    return warmup if steps > warmup else steps * warmup // DEMO_TRAIN["steps"]


def make_corpus(corpus: str = DEMO_CORPUS, tokenizer: str = DEMO_TOKENIZER) -> int:
    """Runs `python -m llama_jax.train_tokenizer --pydoc-topics CORPUS --output TOKENIZER` unless TOKENIZER
    exists (then only a missing corpus folder is written again); returns its exit code."""
    from llama_jax.data import write_pydoc_topics
    from llama_jax.train_tokenizer import main as train_tokenizer_main

    if not Path(tokenizer).exists():
        return train_tokenizer_main(["--pydoc-topics", corpus, "--output", tokenizer])
    if not Path(corpus).is_dir():
        write_pydoc_topics(corpus)
    return 0


def sample(run_dir: str | Path, prompt: str = DEMO_PROMPT, max_new_tokens: int = DEMO_SAMPLE_TOKENS) -> str:
    """The prompt followed by its greedy continuation from the run folder's latest checkpoint."""
    from llama_jax.checkpoint import TOKENIZER_FILE
    from llama_jax.generation import Generator
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(Path(run_dir) / TOKENIZER_FILE)
    ids = tok.encode(prompt, bos=True, eos=False)
    generator = Generator.from_checkpoint(run_dir, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    new = generator.generate([ids], max_new_tokens=max_new_tokens).tokens[0]
    # Decoded after the prompt, not alone: SentencePiece drops the leading space of a sequence's first piece.
    return prompt + tok.decode([*ids, *new])[len(tok.decode(ids)):]
