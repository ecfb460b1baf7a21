"""Training: loss against an independent reference, gradient accumulation, exact resume, NaN stop, bad configs,
fine-tuning from a model folder, and the no-download demo.

Runs of the CLI are subprocesses (that is how people use it, and the 8-device flag needs a fresh jax).
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import checkpoint as ckpt
from llama_jax import train as T
from llama_jax.config import LlamaConfig
from llama_jax.model import forward, init_params
from subprocess_env import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=32, max_seq_len=64)
# A tiny model on a slice of the demo corpus: what the CLI tests train.
TINY_FLAGS = ["--preset", "demo", "--set", "dim=64", "--set", "n_layers=2", "--set", "multiple_of=32",
              "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "1", "--seed", "5",
              "--no-progress"]


def run_cli(*args: str, devices: int = 1, timeout: int = 240, cwd: Path = ROOT):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT), **CACHE_ENV}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train_losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    return {r["step"]: r["loss"] for r in T.read_metrics(run_dir) if r["split"] == split}


def data_flags(corpus) -> list[str]:
    return ["--data", str(corpus[0]), "--tokenizer", str(corpus[1])]


# --- the step itself -------------------------------------------------------------------------------------------

def _numpy_loss(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return float((nll * mask).sum() / mask.sum())


def _jit_forward(config):
    return jax.jit(lambda p, t, pos: forward(p, t, pos, config=config)[0])


def _params(config, seed=0):
    """Random parameters without compiling a random initialiser (XLA:CPU takes seconds for that)."""
    from hf_reference import random_meta_state
    from llama_jax.meta_weights import params_from_meta

    state = random_meta_state(config, seed)
    return jax.tree.map(jnp.asarray, params_from_meta({k: v.numpy() for k, v in state.items()}, config))


def test_loss_is_masked_mean_cross_entropy():
    config = LlamaConfig(**SMALL)
    params = _params(config, seed=1)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, config.vocab_size, (3, 11))
    mask = rng.random((3, 10)) < 0.7
    loss_sums = jax.jit(lambda *a: T.loss_sums(*a, config=config))
    total, count = loss_sums(params, jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:]), jnp.asarray(mask))
    positions = np.broadcast_to(np.arange(10), (3, 10))
    logits = _jit_forward(config)(params, jnp.asarray(rows[:, :-1]), jnp.asarray(positions))
    assert float(count) == mask.sum()
    assert float(total) / float(count) == pytest.approx(_numpy_loss(np.asarray(logits), rows[:, 1:], mask), rel=1e-6)


def test_grad_accumulation_of_4xB_equals_one_step_of_4B():
    """The gradient and loss the optimizer receives; the 1-micro-batch path and the scanned path differ in code."""
    config = LlamaConfig(**SMALL)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, config.vocab_size, (8, 17)).astype(np.int32)
    # Uneven masks: the mean must be over all tokens of the big batch, not a mean of micro-batch means.
    mask = rng.random((8, 16)) < np.linspace(0.2, 1.0, 8)[:, None]
    one = [jnp.asarray(x[None]) for x in (rows[:, :-1], rows[:, 1:], mask)]      # [1, 8, T]
    four = [x.reshape(4, 2, *x.shape[2:]) for x in one]                          # [4, 2, T], same rows
    params = _params(config)

    grads_fn = jax.jit(lambda p, *b: T.accumulate_gradients(p, *b, config=config))
    g1, loss1, n1 = grads_fn(params, *one)
    g4, loss4, n4 = grads_fn(params, *four)
    assert float(n1) == float(n4) == mask.sum()
    assert float(loss4) == pytest.approx(float(loss1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * np.abs(a).max())
    # Reference for the mean: the gradient of the plain masked-mean loss over all 8 rows at once.
    ref = jax.jit(jax.grad(lambda p: T.loss_sums(p, *[x[0] for x in one], config=config)[0] / mask.sum()))(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * np.abs(a).max())



def test_bf16_compute_keeps_fp32_master_weights():
    fp32 = LlamaConfig(**SMALL)
    bf16 = fp32.replace(dtype="bfloat16")
    params = _params(fp32)
    rows = np.random.default_rng(1).integers(0, fp32.vocab_size, (1, 4, 17)).astype(np.int32)
    batch = (jnp.asarray(rows[..., :-1]), jnp.asarray(rows[..., 1:]), jnp.ones((1, 4, 16), bool))
    results = [jax.jit(lambda p, *b, c=c: T.accumulate_gradients(p, *b, config=c))(params, *batch)
               for c in (fp32, bf16)]
    (g32, loss32, _), (g16, loss16, _) = results
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # gradients land on the fp32 weights
    assert float(loss16) == pytest.approx(float(loss32), rel=2e-2)  # bf16 matmuls: ~3 significant digits
    assert float(loss16) != float(loss32)  # and the flag really switched the compute dtype


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    tc = T.TrainConfig(run_dir="-", data="-", steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    schedule = T.lr_schedule(tc)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-4)  # cosine half-way
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_no_weight_decay_on_norms():
    config = LlamaConfig(**SMALL)
    mask = T._decay_mask(jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
    assert not mask["norm"]["weight"] and not mask["layers"]["attention_norm"]["weight"]
    assert mask["layers"]["attention"]["wq"] and mask["tok_embeddings"]


def test_flops_per_token_by_hand():
    config = LlamaConfig(**SMALL)
    d, f, L, V, T_ = 64, config.hidden_dim, 2, 400, 32
    per_layer = d * d + 2 * d * (2 * 16) + d * d + 3 * d * f  # wq, wk+wv (2 kv heads x 16), wo, w1 w2 w3
    matmul = L * per_layer + d * V + (L * 2 * d + d)  # + output head + norm gains (counted, negligible)
    assert T.flops_per_token(config, T_) == 6 * matmul + 12 * L * d * T_


# --- the CLI -------------------------------------------------------------------------------------------------

def test_help():
    proc = ok(run_cli("--help"))
    for flag in ("--preset", "--resume", "--grad-accum", "--mesh-fsdp", "--coordinator", "--init-from"):
        assert flag in proc.stdout


@pytest.mark.parametrize("flags, devices, message", [
    (["--set", "n_heads=5"], 1, "n_heads=5 must divide dim=64"),
    (["--mesh-data", "4", "--mesh-fsdp", "4"], 8, "needs 16 devices, only 8 available"),
    (["--batch-size", "6", "--mesh-data", "4"], 8, "micro-batch 6 (--batch-size 6 / --grad-accum 1) is not divisible "
                                                   "by the data axes data x fsdp = 4 x 1"),
    (["--batch-size", "8", "--grad-accum", "3"], 1, "--batch-size=8 is not divisible by --grad-accum=3"),
    (["--mesh-tensor", "8"], 8, "model n_heads=4 is not divisible by --mesh-tensor=8"),
    (["--seq-len", "1024"], 1, "--seq-len=1024 exceeds the model's max_seq_len=256"),
    (["--preset", "nope"], 1, "--preset='nope': expected one of"),
])
def test_bad_config_is_a_one_line_error_before_anything_runs(tmp_path, corpus, flags, devices, message):
    args = [*TINY_FLAGS, *data_flags(corpus), "--run-dir", str(tmp_path / "run"), *flags]
    if flags[0] == "--preset":
        args = args[2:]
    proc = run_cli(*args, devices=devices)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_missing_data_and_tokenizer_errors(tmp_path, corpus):
    proc = run_cli(*TINY_FLAGS, "--data", str(tmp_path / "none"), "--tokenizer", str(corpus[1]),
                   "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "none: no such file or folder" in proc.stderr
    proc = run_cli(*TINY_FLAGS, "--data", str(corpus[0]), "--tokenizer", str(corpus[0] / "0.txt"),
                   "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2 and "0.txt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_with_exactly_the_same_losses(tmp_path, corpus):
    # Sharded state (4 data x 2 fsdp) and accumulation, so restoring places every shard back where it was.
    flags = [*TINY_FLAGS, *data_flags(corpus), "--steps", "7", "--save-every", "2", "--eval-every", "3",
             "--mesh-fsdp", "2", "--grad-accum", "2", "--batch-size", "16"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    ok(run_cli(*flags, "--run-dir", str(full), devices=8))
    killed = run_cli(*flags, "--run-dir", str(broken), "--stop-after", "5", devices=8)
    assert killed.returncode == 0 and max(train_losses(broken)) == 5
    assert not (broken / "loss.png").exists()  # it really stopped early
    # Refuses to start over a run by accident ...
    again = run_cli(*flags, "--run-dir", str(broken), devices=8)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    # ... and with --resume needs nothing but the run folder.
    ok(run_cli("--run-dir", str(broken), "--resume", "--no-progress", devices=8))

    assert train_losses(broken) == train_losses(full)  # bit-for-bit, every step 1..7
    assert len(train_losses(full)) == 7
    assert train_losses(broken, "eval") == train_losses(full, "eval")
    assert (broken / "loss.png").is_file()
    events = [f.read_bytes() for f in (full / "tensorboard").iterdir() if f.name.startswith("events.out.tfevents")]
    assert events and all(b"train/loss" in e and b"eval/perplexity" in e for e in events)

    # The run folder is a model folder: the last step's parameters load for generation and give the held-out
    # loss that training logged, recomputed here with numpy log-softmax on model.forward's logits.
    params, config, tok_path = ckpt.load_model(full)
    assert tok_path.read_bytes() == corpus[1].read_bytes() and config.dim == 64
    _, held_out = T.load_data(T.TrainConfig.from_dict(json.loads((full / T.TRAIN_CONFIG_FILE).read_text())),
                              full / "tokenizer.model")
    rows, mask = held_out.rows, held_out.loss_mask
    positions = np.broadcast_to(np.arange(rows.shape[1] - 1), (len(rows), rows.shape[1] - 1))
    logits = _jit_forward(config)(params, jnp.asarray(rows[:, :-1]), jnp.asarray(positions))
    assert _numpy_loss(np.asarray(logits), rows[:, 1:], mask) == pytest.approx(train_losses(full, "eval")[7], rel=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    # Adam moves every weight by ~lr per step, so lr=1e30 overflows the activations within a few steps.
    proc = run_cli(*TINY_FLAGS, *data_flags(corpus), "--run-dir", str(run), "--steps", "6", "--save-every", "1",
                   "--lr", "1e30", "--warmup-steps", "0")
    assert proc.returncode == 1
    match = re.fullmatch(r"error: (loss became (nan|inf)|parameters became non-finite \(loss was \S+\)) at step "
                         r"(\d+); stopped without saving, the last good checkpoint \(step (\d+)\) is intact",
                         proc.stderr.strip())
    assert match, proc.stderr[-2000:]
    bad, last_good = int(match[3]), int(match[4])
    assert 2 <= bad <= 6 and last_good == bad - 1
    assert T.checkpoint_steps(run)[-1] == last_good  # nothing of the bad step was written
    assert all(math.isfinite(loss) for loss in train_losses(run).values())
    assert max(train_losses(run)) == last_good
    params, _, _ = ckpt.load_model(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_fine_tune_starts_from_the_model_folder(tmp_path, corpus):
    """--init-from: the first step's loss is the loss of the saved parameters, not of a fresh init."""
    config = LlamaConfig(**{**SMALL, "max_seq_len": 64})
    params = _params(config, seed=42)
    model_dir = tmp_path / "model"
    ckpt.save_model(model_dir, params, config, corpus[1])
    tc = T.TrainConfig(run_dir=str(tmp_path / "ft"), data=str(corpus[0]), model=T.ModelSpec(init_from=str(model_dir)),
                       steps=2, batch_size=4, seq_len=32, warmup_steps=0, lr=1e-4, eval_every=2, save_every=2)
    setup = T.prepare(tc)
    assert setup.tokenizer_path == model_dir / "tokenizer.model"
    result = T.train(setup, progress=False)

    train_rows, _ = T.load_data(tc, setup.tokenizer_path)
    from llama_jax.data import BatchIterator

    batch = next(BatchIterator(train_rows, 4, seed=tc.seed)).fields()
    positions = np.broadcast_to(np.arange(32), (4, 32))
    logits = _jit_forward(config)(params, jnp.asarray(batch["inputs"][0]), jnp.asarray(positions))
    expected = _numpy_loss(np.asarray(logits), batch["targets"][0], batch["loss_mask"][0])
    assert result.losses[1] == pytest.approx(expected, rel=1e-5)
    # Shapes of a pretrained model cannot be overridden.
    bad = tc.replace(run_dir=str(tmp_path / "ft2"), model=T.ModelSpec(init_from=str(model_dir), overrides={"dim": 128}))
    with pytest.raises(T.TrainError, match=r"cannot change \['dim'\]"):
        T.prepare(bad)


# Threshold for the demo test below: the corpus's unigram entropy is 6.1 nats/token and uniform guessing over the
# 2000-piece vocabulary is ln 2000 = 7.6, so a held-out loss under 5.2 needs context. Full demo runs reach ~4.8
# at step 100 and ~3.1 at step 600.
DEMO_HELD_OUT_THRESHOLD = 5.2


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The README demo's first 100 of its 600 steps (same schedule): tokenizer on pydoc topics, demo preset."""
    from llama_jax.train_tokenizer import main as train_tokenizer_main

    assert train_tokenizer_main(["--pydoc-topics", str(tmp_path / "pydoc"), "--output",
                                 str(tmp_path / "pydoc.model")]) == 0
    run = tmp_path / "run"
    ok(run_cli("--preset", "demo", "--data", str(tmp_path / "pydoc"), "--tokenizer", str(tmp_path / "pydoc.model"),
               "--run-dir", str(run), "--stop-after", "100", "--no-progress", timeout=400))
    held_out = train_losses(run, "eval")[100]
    assert held_out < DEMO_HELD_OUT_THRESHOLD < math.log(2000)
    assert train_losses(run)[1] > 7.0  # it started from chance (ln 2000 = 7.6), not from a lucky init
    assert ckpt.load_config(run).vocab_size == 2000


@pytest.mark.slow
def test_demo_in_one_command(tmp_path):
    """--demo: corpus and tokenizer under the current folder, the demo preset, then a greedy sample; again with
    --resume, the tokenizer is reused."""
    run = tmp_path / "run"
    proc = ok(run_cli("--demo", "--steps", "3", "--run-dir", str(run), "--no-progress", cwd=tmp_path))
    assert (tmp_path / "data" / "pydoc.model").is_file() and len(list((tmp_path / "data" / "pydoc").iterdir())) > 50
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert ckpt.load_config(run).vocab_size == 2000 and (run / "tokenizer.model").is_file()
    prompt = 'The "with" statement'
    assert prompt in proc.stdout
    # After 3 steps the greedy continuation is mostly newlines: text all the same, beyond print's own newline.
    assert len(proc.stdout.split(prompt, 1)[1]) > 1

    again = ok(run_cli("--demo", "--resume", "--steps", "4", "--run-dir", str(run), "--no-progress", cwd=tmp_path))
    assert "pydoc.model" not in again.stdout and prompt in again.stdout
    assert sorted(train_losses(run)) == [1, 2, 3, 4]
