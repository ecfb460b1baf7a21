"""Data pipeline: reading, packing with separators and loss mask, seeded order, resumable position, sharding."""

import json

import numpy as np
import pytest

from llama_jax import data
from llama_jax.data import BatchIterator, DataError, Packed, pack, sample_rows, split

BOS, EOS, PAD = 1, 2, 0


def _doc(*ids):
    return np.asarray([BOS, *ids, EOS], np.int32)


def test_pack_by_hand():
    # Worked out on paper. The seed decides the document order, so take the stream from that order ...
    docs = [_doc(10, 11, 12), _doc(20, 21, 22)]
    order = np.random.default_rng([0, 0x5EED]).permutation(2)
    stream = np.concatenate([docs[i] for i in order])  # 10 tokens
    packed = pack(docs, seq_len=4, bos_id=BOS, pad_id=PAD, seed=0)
    # ... 9 targets need ceil(9 / 4) = 3 windows of 5 tokens overlapping by one: [0:5], [4:9], [8:10] + 3 pads.
    expected_rows = np.stack([stream[0:5], stream[4:9], np.r_[stream[8:10], [PAD] * 3]])
    np.testing.assert_array_equal(packed.rows, expected_rows)
    # Targets are rows[:, 1:]; a target counts unless it is padding or a document's leading bos.
    targets = expected_rows[:, 1:]
    real = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(packed.loss_mask, real & (targets != BOS))
    # Every token except the very first is a target once; of those only the second document's bos is masked.
    assert packed.num_target_tokens == len(stream) - 1 - 1


def test_pack_counts_every_token_once_on_random_documents():
    rng = np.random.default_rng(3)
    docs = [_doc(*rng.integers(3, 50, rng.integers(0, 30))) for _ in range(40)]
    packed = pack(docs, seq_len=16, bos_id=BOS, pad_id=PAD, seed=5)
    total = sum(len(d) for d in docs)
    # Rows overlap by exactly one token: dropping each row's first token rebuilds the stream after its first token.
    rebuilt = np.concatenate([packed.rows[0, :1], packed.rows[:, 1:].reshape(-1)])[:total]
    assert sorted(rebuilt.tolist()) == sorted(np.concatenate(docs).tolist())
    assert packed.num_target_tokens == total - len(docs)  # the first token and every later document's bos
    assert not packed.loss_mask[packed.rows[:, 1:] == BOS].any()


def test_pack_order_is_seeded():
    docs = [_doc(i, i + 1) for i in range(3, 40, 2)]
    a = pack(docs, 8, bos_id=BOS, pad_id=PAD, seed=1)
    b = pack(docs, 8, bos_id=BOS, pad_id=PAD, seed=1)
    c = pack(docs, 8, bos_id=BOS, pad_id=PAD, seed=2)
    np.testing.assert_array_equal(a.rows, b.rows)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_pack_rejects_empty_corpus():
    with pytest.raises(DataError, match="fewer than 2 tokens"):
        pack([np.asarray([BOS], np.int32)], 8, bos_id=BOS, pad_id=PAD)


def _packed(n_rows=10, seq_len=4):
    rows = np.arange(n_rows * (seq_len + 1), dtype=np.int32).reshape(n_rows, seq_len + 1) + 10
    return Packed(rows, np.ones((n_rows, seq_len), bool))


def test_split_is_disjoint_and_deterministic():
    packed = _packed(20)
    train, held = split(packed, 0.25, seed=4)
    train2, held2 = split(packed, 0.25, seed=4)
    np.testing.assert_array_equal(held.rows, held2.rows)
    assert len(held) == 5 and len(train) == 15
    seen = {tuple(r) for r in train.rows} | {tuple(r) for r in held.rows}
    assert len(seen) == 20
    assert not {tuple(r) for r in train.rows} & {tuple(r) for r in held.rows}
    with pytest.raises(DataError, match="eval-fraction"):
        split(packed, 1.5)
    with pytest.raises(DataError, match="too few"):
        split(_packed(1), 0.1)


def test_every_epoch_is_a_fresh_permutation():
    rows = sample_rows(7, 0, 21, seed=9)
    epochs = rows.reshape(3, 7)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(7))
    assert not (epochs[0] == epochs[1]).all()
    # A window that straddles epochs is the same slice of the stream.
    np.testing.assert_array_equal(sample_rows(7, 5, 6, seed=9), rows[5:11])


def test_iterator_resumes_with_the_next_batch():
    packed = _packed(13)
    it = BatchIterator(packed, batch_size=4, grad_accum=2, seed=3)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.state()))  # it travels through a JSON checkpoint item
    expected = [next(it).row_ids for _ in range(3)]
    resumed = BatchIterator(packed, batch_size=4, grad_accum=2, seed=3)
    resumed.restore(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed).row_ids, want)
    assert expected[0].shape == (2, 2)


def test_iterator_refuses_other_data():
    it = BatchIterator(_packed(13), batch_size=4, seed=3)
    other = BatchIterator(_packed(14), batch_size=4, seed=3)
    with pytest.raises(DataError, match="num_rows"):
        other.restore(it.state())


def test_batch_fields_shift_targets_and_slice_like_the_whole():
    packed = _packed(6, seq_len=4)
    batch = data.Batch(packed, np.array([[5, 0, 2, 3]]))
    whole = batch.fields()
    np.testing.assert_array_equal(whole["inputs"][0, 0], packed.rows[5, :-1])
    np.testing.assert_array_equal(whole["targets"][0, 0], packed.rows[5, 1:])
    # What one device asks for (a slice of the micro-batch axis) equals that slice of the whole batch.
    part = batch.fields((slice(0, 1), slice(2, 4), slice(None)))
    for name in whole:
        np.testing.assert_array_equal(part[name], whole[name][:, 2:4])


def test_eval_batches_pad_with_masked_rows():
    packed = _packed(5)
    batches = data.eval_batches(packed, micro_batch=2)
    assert len(batches) == 3
    last = batches[-1].fields()
    assert last["loss_mask"][0, 0].all() and not last["loss_mask"][0, 1].any()
    assert sum(b.fields()["loss_mask"].sum() for b in batches) == packed.num_target_tokens
    assert len(data.eval_batches(packed, micro_batch=2, max_batches=1)) == 1


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": "fourth"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\xff\x00")
    assert data.read_documents(tmp_path) == ["first doc\n", "third", "fourth", "second\n"]
    assert data.read_documents(tmp_path / "a.txt") == ["first doc\n"]


@pytest.mark.parametrize("name, content, message", [
    ("bad.txt", b"\xff\xfe not utf-8", "bad.txt: not UTF-8"),
    ("bad.jsonl", b'{"text": 1}\n', 'bad.jsonl:1: expected an object with a string "text"'),
    ("bad.jsonl", b"{oops\n", "bad.jsonl:1: not valid JSON"),
])
def test_read_documents_errors_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        data.read_documents(tmp_path)


def test_missing_or_empty_data(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        data.read_documents(tmp_path / "nope")
    with pytest.raises(DataError, match="holds no"):
        data.read_documents(tmp_path)


def test_pydoc_topics_ship_with_python(tmp_path):
    paths = data.write_pydoc_topics(tmp_path)
    assert len(paths) > 50
    docs = data.read_documents(tmp_path)
    assert any('The "assert" statement' in d for d in docs)


def test_trained_tokenizer_round_trips(tmp_path):
    from llama_jax.tokenizer import load_tokenizer
    from llama_jax.train_tokenizer import main

    corpus = tmp_path / "corpus"
    assert main(["--pydoc-topics", str(corpus), "--output", str(tmp_path / "tok.model"), "--vocab-size", "600"]) == 0
    tok = load_tokenizer(tmp_path / "tok.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (600, 1, 2)
    text = 'The "with" statement\n\n   with open(p) as f:  # ünïcode ✓\n'
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == text
    # The corpus is learned: its text takes well under one piece per character (bytes alone would take one).
    topic = data.pydoc_topics()["assert"]
    assert len(tok.encode(topic, bos=False, eos=False)) < 0.6 * len(topic)


def test_train_tokenizer_cli_errors(tmp_path, capsys):
    from llama_jax.train_tokenizer import main

    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "t.model")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "t.model").exists()
