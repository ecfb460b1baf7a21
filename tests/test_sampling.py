"""Sampling filters against numpy re-implementations of their definitions, and draw frequencies (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.sampling import SamplerSwitches, SamplingError, SamplingParams, filtered_probs, greedy, sample, sample_rows

try:
    from scipy.stats import chi2 as _chi2
except ImportError:  # pragma: no cover - scipy is optional
    _chi2 = None

# chi-square critical values at p = 0.001 (tabulated), used when scipy is absent.
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877,
                 10: 29.588, 11: 31.264}


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_expected(logits, temperature, top_k=0, top_p=1.0):
    """The distribution the definitions give: softmax(logits / T), keep the k largest, renormalise, keep the
    smallest most-likely set whose mass reaches p, renormalise. Written independently of llama_jax.sampling."""
    probs = np_softmax(np.asarray(logits, np.float64) / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[: top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0.0)
    probs /= probs.sum()
    if top_p < 1.0:
        sorted_p = probs[order]
        n = int(np.searchsorted(np.cumsum(sorted_p), top_p) + 1)  # first prefix with mass >= p
        nucleus = np.zeros_like(keep)
        nucleus[order[:n]] = True
        probs = np.where(nucleus, probs, 0.0)
        probs /= probs.sum()
    return probs


def dense(probs, ids, vocab):
    out = np.zeros(probs.shape[:-1] + (vocab,))
    np.put_along_axis(out, np.asarray(ids), np.asarray(probs, np.float64), axis=-1)
    return out


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0])
def test_top_p_keeps_smallest_set_reaching_p(p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (16, 50)).astype(np.float32)
    probs, ids = filtered_probs(jnp.asarray(logits), temperature=1.0, top_p=p, use_top_p=True)
    ours = dense(probs, ids, 50)
    for row in range(16):
        want = np_expected(logits[row], 1.0, top_p=p)
        assert set(np.flatnonzero(ours[row])) == set(np.flatnonzero(want)), f"row {row}: kept set differs"
        np.testing.assert_allclose(ours[row], want, atol=1e-5)
        # The kept set reaches p, and dropping its least likely member would not.
        base = np_softmax(logits[row].astype(np.float64))
        kept = np.flatnonzero(want)
        assert base[kept].sum() >= p - 1e-6
        assert base[kept].sum() - base[kept].min() < p


@pytest.mark.parametrize("k", [1, 3, 17])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_and_temperature_match_numpy(k, temperature):
    rng = np.random.default_rng(k)
    logits = rng.normal(0, 2, (8, 40)).astype(np.float32)
    probs, ids = filtered_probs(jnp.asarray(logits), temperature=temperature, top_k=k, use_top_p=False)
    ours = dense(probs, ids, 40)
    want = np.stack([np_expected(row, temperature, top_k=k) for row in logits])
    np.testing.assert_allclose(ours, want, atol=1e-5)


def test_top_k_then_top_p_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (8, 40)).astype(np.float32)
    probs, ids = filtered_probs(jnp.asarray(logits), temperature=0.7, top_k=10, top_p=0.6, use_top_p=True)
    want = np.stack([np_expected(row, 0.7, top_k=10, top_p=0.6) for row in logits])
    np.testing.assert_allclose(dense(probs, ids, 40), want, atol=1e-5)


def test_top_k_1_equals_greedy():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(0, 1, (32, 100)).astype(np.float32))
    want = np.argmax(np.asarray(logits), axis=-1)
    for seed in range(5):
        got = sample(logits, jax.random.key(seed), temperature=1.3, top_k=1)
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(greedy(logits)), want)
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(0), temperature=0.0)), want)


def _chi_square(counts, expected_probs):
    support = expected_probs > 0
    assert counts[~support].sum() == 0, f"drew filtered-out ids {np.flatnonzero(counts * ~support)}"
    n = counts.sum()
    exp = n * expected_probs[support]
    stat = float(((counts[support] - exp) ** 2 / exp).sum())
    dof = int(support.sum()) - 1
    crit = _chi2.ppf(0.999, dof) if _chi2 is not None else CHI2_CRIT_001[dof]
    return stat, crit


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 5, 1.0),
                                                     (1.0, 0, 0.8), (0.8, 6, 0.9)])
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p):
    logits = jnp.asarray([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.25, 0.75])
    n = 20000
    keys = jax.random.split(jax.random.key(1234), n)
    draw = jax.jit(jax.vmap(lambda k: sample(logits, k, temperature=temperature, top_k=top_k, top_p=top_p,
                                             is_greedy=False, use_top_p=top_p < 1)))
    counts = np.bincount(np.asarray(draw(keys)), minlength=10)
    stat, crit = _chi_square(counts, np_expected(np.asarray(logits), temperature, top_k, top_p))
    assert stat < crit, f"chi-square {stat:.1f} >= critical {crit:.1f}; counts {counts}"


def test_sampling_is_reproducible_per_seed_and_row():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(0, 1, (4, 64)).astype(np.float32))
    kw = dict(temperature=1.0, top_p=0.95)
    a = sample_rows(logits, jax.random.key(7), 3, **kw)
    b = sample_rows(logits, jax.random.key(7), 3, **kw)
    np.testing.assert_array_equal(a, b)
    # A row's draw does not depend on what else is in the batch.
    np.testing.assert_array_equal(sample_rows(logits[:1], jax.random.key(7), 3, **kw), a[:1])
    # Other seeds and other steps give other draws (over 64 ids and many seeds, some must differ).
    others = [sample_rows(logits, jax.random.key(s), 3, **kw) for s in range(8, 16)]
    assert any((np.asarray(o) != np.asarray(a)).any() for o in others)
    assert (np.asarray(sample_rows(logits, jax.random.key(7), 4, **kw)) != np.asarray(a)).any() or \
        (np.asarray(sample_rows(logits, jax.random.key(7), 5, **kw)) != np.asarray(a)).any()


@pytest.mark.parametrize("kw,needle", [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                       ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                                       ({"temperature": float("nan")}, "temperature")])
def test_sampling_params_reject_bad_values(kw, needle):
    with pytest.raises(SamplingError, match=needle):
        SamplingParams(**kw)


def test_switches():
    assert SamplingParams().switches == SamplerSwitches(greedy=True, top_k=0, top_p=False)
    assert SamplingParams(temperature=0.0, top_k=5, top_p=0.5).switches == SamplerSwitches(True, 0, False)
    assert SamplingParams(temperature=0.7, top_k=5, top_p=0.9).switches == SamplerSwitches(False, 5, True)
    hash(SamplingParams(temperature=0.7).switches)  # a static jit argument
