"""Training from a prepared dataset: document masking on by default, exact resume after a kill, and a dataset
that does not fit the run refused with one line before anything compiles."""

import json

import pytest

from llama_jax import train as T
from llama_jax.dataset.prepare import prepare_dataset
from test_train import TINY_FLAGS, ok, run_cli, train_losses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare_dataset([str(corpus[0])], corpus[1], out, workers=1, progress=False, log=lambda line: None)
    return out, corpus[1]


@pytest.mark.slow
def test_killed_run_on_prepared_data_resumes_with_exactly_the_same_losses(tmp_path, dataset):
    flags = [*TINY_FLAGS, "--data", str(dataset[0]), "--tokenizer", str(dataset[1]), "--steps", "5",
             "--save-every", "2", "--eval-every", "2", "--mesh-fsdp", "2", "--grad-accum", "2", "--batch-size", "16"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    ok(run_cli(*flags, "--run-dir", str(full), devices=8))
    killed = run_cli(*flags, "--run-dir", str(broken), "--stop-after", "3", devices=8)
    assert killed.returncode == 0 and max(train_losses(broken)) == 3
    ok(run_cli("--run-dir", str(broken), "--resume", "--no-progress", devices=8))
    assert train_losses(broken) == train_losses(full) and len(train_losses(full)) == 5
    assert train_losses(broken, "eval") == train_losses(full, "eval")
    tc = T.TrainConfig.from_dict(json.loads((full / T.TRAIN_CONFIG_FILE).read_text()))
    assert tc.uses_document_mask  # the default for a prepared dataset
    # The checkpoint's data state is the position and the manifest's digest, not a hash of the rows.
    state = json.loads((full / "4" / "data" / "metadata").read_text())
    assert state["samples"] == 4 * 16 and len(state["fingerprint"].split(":")[0]) == 16


def test_document_mask_changes_the_loss_and_can_be_turned_off(tmp_path, dataset):
    base = [*TINY_FLAGS, "--data", str(dataset[0]), "--tokenizer", str(dataset[1]), "--steps", "1",
            "--warmup-steps", "0", "--save-every", "1", "--eval-every", "1", "--seq-len", "64"]
    ok(run_cli(*base, "--run-dir", str(tmp_path / "on")))
    ok(run_cli(*base, "--no-document-mask", "--run-dir", str(tmp_path / "off")))
    assert train_losses(tmp_path / "on")[1] != train_losses(tmp_path / "off")[1]


def test_a_dataset_that_does_not_fit_the_run_is_one_line(tmp_path, dataset, corpus):
    from llama_jax.train_tokenizer import train_tokenizer

    other = tmp_path / "other.model"
    train_tokenizer([p.read_text() for p in sorted(corpus[0].iterdir())], other, vocab_size=420)
    proc = run_cli(*TINY_FLAGS, "--data", str(dataset[0]), "--tokenizer", str(other), "--run-dir", str(tmp_path / "r"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "prepared with another tokenizer" in lines[0], proc.stderr
    assert "manifest.json" in lines[0] and not (tmp_path / "r").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in dataset[0].iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:100] if f.suffix == ".tokens" else f.read_bytes())
    proc = run_cli(*TINY_FLAGS, "--data", str(broken), "--tokenizer", str(dataset[1]), "--run-dir", str(tmp_path / "r"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "shard-00000.tokens: 100 bytes" in lines[0], proc.stderr
