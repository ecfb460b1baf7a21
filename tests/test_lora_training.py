"""LoRA fine-tuning end to end on a small model: adapters start from the base model's loss, are all that trains
and all that a checkpoint holds, resume exactly, load for generation, and are refused on another base."""

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import checkpoint as ckpt
from llama_jax import train as T
from llama_jax.adapters import ADAPTER_FILE, AdapterInfo
from llama_jax.config import LlamaConfig
from llama_jax.data import BatchIterator
from test_train import SMALL, _jit_forward, _numpy_loss, _params, data_flags, ok, run_cli, train_losses

LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "wq,wv,w2", "--seq-len", "32",
              "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "0", "--eval-every", "2", "--save-every", "2",
              "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus):
    folder = tmp_path_factory.mktemp("lora") / "base"
    config = LlamaConfig(**SMALL)
    ckpt.save_model(folder, _params(config, seed=11), config, corpus[1])
    return folder


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_lora_run_trains_adapters_on_the_frozen_base(tmp_path, corpus, base):
    tc = T.TrainConfig(run_dir=str(tmp_path / "run"), data=str(corpus[0]), model=T.ModelSpec(init_from=str(base)),
                       steps=4, batch_size=4, seq_len=32, warmup_steps=0, lr=1e-2, eval_every=2, save_every=2,
                       lora_rank=4, lora_alpha=8.0, lora_targets="wq,wv,w2")
    setup = T.prepare(tc)
    result = T.train(setup, progress=False)

    # Step 1: B starts at zero, so the loss is the base model's on that batch, recomputed here with numpy.
    params, config, _ = ckpt.load_model(base)
    train_rows, _ = T.load_data(tc, setup.tokenizer_path)
    batch = next(BatchIterator(train_rows, 4, seed=tc.seed)).fields()
    positions = np.broadcast_to(np.arange(32), (4, 32))
    logits = _jit_forward(config)(params, batch["inputs"][0], positions)
    assert result.losses[1] == pytest.approx(_numpy_loss(np.asarray(logits), batch["targets"][0],
                                                         batch["loss_mask"][0]), rel=1e-5)
    # The adapters learn: the held-out loss after 4 steps is below the base model's own on the same rows.
    _, held_out = T.load_data(tc, setup.tokenizer_path)
    every = held_out.gather(np.arange(len(held_out)))
    rows, mask = every["rows"], every["loss_mask"]
    logits = _jit_forward(config)(params, rows[:, :-1], np.broadcast_to(np.arange(32), (len(rows), 32)))
    assert train_losses(tmp_path / "run", "eval")[4] < _numpy_loss(np.asarray(logits), rows[:, 1:], mask)

    # A checkpoint holds the adapters only: a and b of the three targets, a small part of the base's size.
    run = tmp_path / "run"
    tree = ocp.StandardCheckpointer().metadata((run / "4" / "params").absolute()).item_metadata.tree
    names = sorted(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(tree))
    assert names == sorted(f"['layers']['{m}']['{t}']['{x}']" for m, t in
                           (("attention", "wq"), ("attention", "wv"), ("feed_forward", "w2")) for x in "ab")
    assert dir_bytes(run / "4" / "params") < dir_bytes(base / "params") / 3
    info = AdapterInfo.read(run)
    assert info.base == str(base.resolve()) and info.lora == tc.lora

    # Generation: the run folder loads its recorded base with the adapters, unmerged.
    from llama_jax.generation import Generator

    gen = Generator.from_checkpoint(base, adapter=run)
    assert len(gen.generate([[1, 5, 9]], max_new_tokens=4).tokens[0]) == 4


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_refuses_another_base(tmp_path, corpus, base):
    flags = [*data_flags(corpus)[:2], "--init-from", str(base), *LORA_FLAGS, "--steps", "4"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    ok(run_cli(*flags, "--run-dir", str(full)))
    killed = run_cli(*flags, "--run-dir", str(broken), "--stop-after", "3")
    assert killed.returncode == 0 and max(train_losses(broken)) == 3
    ok(run_cli("--run-dir", str(broken), "--resume", "--no-progress"))
    assert train_losses(broken) == train_losses(full)  # bit for bit, steps 1..4
    assert all(math.isfinite(v) for v in train_losses(full).values())

    # Another base of the same shapes: resuming on it is refused, naming both.
    other = tmp_path / "other"
    ckpt.save_model(other, _params(LlamaConfig(**SMALL), seed=12), LlamaConfig(**SMALL), corpus[1])
    proc = run_cli("--run-dir", str(full), "--resume", "--init-from", str(other), "--steps", "6", "--no-progress")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "adapters were trained on" in proc.stderr and "is another model" in proc.stderr
    # generate.py on the run folder uses the recorded base.
    assert json.loads((full / ADAPTER_FILE).read_text())["base"] == str(base.resolve())


def test_lora_flags_are_checked_before_anything_runs(tmp_path, corpus, base):
    for extra, needle in ((["--preset", "demo", "--lora-rank", "4"], "--lora-rank needs --init-from"),
                          (["--init-from", str(base), "--lora-rank", "4", "--lora-targets", "wq,q_proj"],
                           "--lora-targets"),
                          (["--init-from", str(base), "--lora-rank", "-1"], "--lora-rank=-1"),
                          (["--init-from", str(base), "--base-dtype", "bfloat16"], "--base-dtype is for LoRA")):
        proc = run_cli(*data_flags(corpus), *extra, "--run-dir", str(tmp_path / "x"), "--no-progress")
        assert proc.returncode == 2 and needle in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_readme_chat_example_in_miniature(tmp_path):
    """The README's chat example with a few steps each: the demo model, the pydoc chat set, LoRA, then chat."""
    import subprocess
    import sys

    from llama_jax.chat_data import main as chat_data_main
    from test_train import ROOT

    ok(run_cli("--demo", "--steps", "3", "--no-progress", cwd=tmp_path))
    assert chat_data_main(["--pydoc-chat", str(tmp_path / "data" / "pydoc-chat.jsonl")]) == 0
    proc = ok(run_cli("--init-from", "runs/demo", "--data", "data/pydoc-chat.jsonl", "--run-dir", "runs/demo-chat",
                      "--lora-rank", "8", "--steps", "3", "--warmup-steps", "0", "--seq-len", "128",
                      "--batch-size", "8", "--log-every", "1", cwd=tmp_path))
    header = next(line for line in proc.stderr.splitlines() if line.startswith("model "))
    assert "% of tokens in the loss" in header and "document masking" in header, header
    chat = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--checkpoint", "runs/demo-chat", "--chat",
                           "--prompt", "What does the documentation say about assert?", "--max-new-tokens", "4",
                           "--temperature", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert chat.returncode == 0 and "tokens/s" in chat.stderr, chat.stderr[-2000:]
