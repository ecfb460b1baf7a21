"""Generation: the jitted engine (engine.py), the host side (generator.py), the decoding weight layout
(weights.py)."""

from llama_jax.inference.engine import TRACE_COUNTS, DecodeState, SamplingInputs
from llama_jax.inference.generator import Generation, GenerationError, Generator, StreamChunk, generate

__all__ = ["DecodeState", "Generation", "GenerationError", "Generator", "SamplingInputs", "StreamChunk",
           "TRACE_COUNTS", "generate"]
