"""`llama_jax.train`: the training API of llama_jax.training under this name too, so that
`from llama_jax import train as T` (tests, benchmarks) keeps working."""

from llama_jax.training import *  # noqa: F401,F403
from llama_jax.training import __all__  # noqa: F401
from llama_jax.training.step import _decay_mask  # noqa: F401  (tests check which parameters decay)
