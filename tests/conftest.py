import sys
from pathlib import Path

import pytest

# Test helpers (hf_reference, meta_checkpoint) are imported as plain modules from this folder.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A dozen pydoc topics (text every Python ships) and a 400-piece tokenizer trained on them."""
    from llama_jax.data import pydoc_topics
    from llama_jax.train_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    docs = [text for _, text in sorted(pydoc_topics().items())[:12]]
    (root / "text").mkdir()
    for i, doc in enumerate(docs):
        (root / "text" / f"{i}.txt").write_text(doc)
    train_tokenizer(docs, root / "tok.model", vocab_size=400)
    return root / "text", root / "tok.model"


@pytest.fixture(scope="session", autouse=True)
def _subprocess_compilation_cache(tmp_path_factory):
    from subprocess_env import CACHE_ENV

    CACHE_ENV.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    yield
    CACHE_ENV.clear()
