"""A seeded bijection over 0..n-1 that costs nothing per element until asked: a Feistel network with cycle-walking.

The loader shuffles and holds out rows by index through it, so no permutation of every row is ever materialised:
row r of epoch e is `Bijection(n, seed, e)(r)`, computed for the few rows a batch needs.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser: a well-mixed 64-bit hash of x + key (uint64 arithmetic wraps on purpose)."""
    z = (x + key) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Bijection:
    """A permutation of 0..n-1 chosen by (seed, stream); `__call__` maps indices, `inverse` maps them back."""

    def __init__(self, n: int, seed: int, stream: int = 0):
        if n < 1:
            raise ValueError(f"Bijection over {n} elements")
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, np.uint64((bits + 1) // 2)
        self.low = np.uint64((1 << int(self.half)) - 1)
        keys = np.random.default_rng([seed, stream, 0xFE15]).integers(0, 2**63, ROUNDS, dtype=np.uint64)
        self.keys = [np.uint64(k) for k in keys]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.low
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.low)
        return (left << self.half) | right

    def _backward(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.low
        for key in reversed(self.keys):
            left, right = right ^ (_mix(left, key) & self.low), left
        return (left << self.half) | right

    def _walk(self, index, step) -> np.ndarray:
        # The network permutes 0..4^half-1 (< 4n); stepping again until the value is below n permutes 0..n-1.
        x = np.asarray(index, dtype=np.int64)
        shape, x = x.shape, x.reshape(-1)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"index out of 0..{self.n - 1}")
        y = step(x.astype(np.uint64))
        out_of_range = y >= self.n
        while out_of_range.any():
            y[out_of_range] = step(y[out_of_range])
            out_of_range = y >= self.n
        return y.astype(np.int64).reshape(shape)

    def __call__(self, index) -> np.ndarray:
        return self._walk(index, self._forward)

    def inverse(self, index) -> np.ndarray:
        return self._walk(index, self._backward)
