"""Generation's public names, where they have always been imported from (llama_jax.inference holds the code)."""

from llama_jax.chat import IncrementalDecoder, encode_chat, fit_dialog
from llama_jax.inference.engine import MAX_STOP_IDS, TRACE_COUNTS, DecodeState
from llama_jax.inference.generator import (Generation, GenerationError, Generator, StreamChunk, generate,
                                           next_power_of_two)

__all__ = ["DecodeState", "Generation", "GenerationError", "Generator", "IncrementalDecoder", "MAX_STOP_IDS",
           "StreamChunk", "TRACE_COUNTS", "encode_chat", "fit_dialog", "generate", "next_power_of_two"]
