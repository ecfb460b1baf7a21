"""LLaMA 2 / 3 in JAX: model, generation, training and Meta checkpoint conversion."""

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling, preset
from llama_jax.model import KVCache, forward, init_cache, init_params

__all__ = ["ConfigError", "KVCache", "LlamaConfig", "RopeScaling", "forward", "init_cache", "init_params", "preset"]
