"""Document masking: a packed row of whole documents costs exactly the sum of their losses computed apart
(Hugging Face's LlamaForCausalLM per document as the reference), on every attention path; accumulation holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits, random_meta_state
from llama_jax import data
from llama_jax import train as T
from llama_jax.config import LlamaConfig
from llama_jax.kernels import Ops
from llama_jax.meta_weights import params_from_meta

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=32, max_seq_len=256)
BOS, EOS, PAD = 1, 2, 0


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray([BOS, *rng.integers(3, 400, n - 2), EOS], np.int32) for n in lengths]


def _nll_sum(logits, targets) -> float:
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.take_along_axis(logp, np.asarray(targets)[..., None], -1).sum())


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(**SMALL)
    state = random_meta_state(config, seed=2)
    params = jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))
    return config, state, params


# 23 tokens: one row of 22 inputs, one mask over it all; 129: 128 inputs, which the einsum path runs in blocks.
@pytest.mark.parametrize("lengths", [(6, 9, 8), (40, 17, 50, 22)])
@pytest.mark.parametrize("kernel", ["einsum", "xla"])
def test_packed_row_loss_is_the_sum_of_its_documents_losses(model, lengths, kernel):
    config, state, params = model
    docs = _docs(lengths)
    seq_len = sum(lengths) - 1
    packed = data.pack(docs, seq_len, bos_id=BOS, pad_id=PAD)
    assert len(packed) == 1
    fields = data.Batch(packed, np.zeros((1, 1), np.int64), document_mask=True).fields()
    batch = [jnp.asarray(fields[name][0]) for name in data.FIELDS + data.SEGMENT_FIELDS]
    ops = Ops(attention_kernel=kernel)
    total, count = jax.jit(lambda p, *b: T.loss_sums(p, *b, config=config, ops=ops))(params, *batch)

    expected = sum(_nll_sum(hf_logits(state, config, d[None, :-1])[0], d[1:]) for d in docs)
    assert float(count) == sum(n - 1 for n in lengths)
    assert float(total) == pytest.approx(expected, rel=2e-5)
    # Positions restart at 0 with each document; without the mask, documents see each other and the loss moves.
    assert (fields["positions"][0, 0][fields["segment_ids"][0, 0] > 0] < max(lengths)).all()
    plain, _ = T.loss_sums(params, *batch[:3], config=config, ops=ops)
    assert abs(float(plain) - expected) > 1e-3 * expected


def test_segments_restart_positions_at_documents_and_at_the_row_start():
    doc_start = np.array([[0, 0, 1, 0, 0, 1, 1, 0, 0]], bool)  # a document continued from the previous row
    seg, pos = data.segments(doc_start)
    np.testing.assert_array_equal(seg, [[0, 0, 1, 1, 1, 2, 3, 3]])
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 0, 0, 1]])


def test_accumulation_holds_with_document_masking(model):
    config, _, params = model
    docs = _docs([int(n) for n in np.random.default_rng(1).integers(3, 30, 40)], seed=1)
    packed = data.pack(docs, 32, bos_id=BOS, pad_id=PAD)
    fields = data.Batch(packed, np.arange(8)[None], document_mask=True).fields()
    one = [jnp.asarray(fields[n]) for n in data.FIELDS + data.SEGMENT_FIELDS]  # [1, 8, T]
    four = [x.reshape(4, 2, *x.shape[2:]) for x in one]
    grads_fn = jax.jit(lambda p, *b: T.accumulate_gradients(p, *b, config=config))
    g1, loss1, n1 = grads_fn(params, *one)
    g4, loss4, n4 = grads_fn(params, *four)
    assert float(n1) == float(n4) == fields["loss_mask"].sum()
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * np.abs(a).max())
