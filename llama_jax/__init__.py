"""LLaMA 2 / 3 in JAX: model, generation, training and Meta checkpoint conversion."""

from llama_jax.config import ConfigError, LlamaConfig, RopeScaling, preset
from llama_jax.kv_cache import KVCache, init_cache
from llama_jax.model import forward, init_params

__all__ = ["ConfigError", "KVCache", "LlamaConfig", "RopeScaling", "forward", "init_cache", "init_params", "preset"]
