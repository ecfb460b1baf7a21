"""An OpenAI-compatible HTTP server over the continuous-batching engine (serve.py is its command line)."""

from llama_jax.serving.app import Server, create_app
from llama_jax.serving.protocol import ApiError

__all__ = ["ApiError", "Server", "create_app"]
