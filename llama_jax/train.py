"""Sharded LLaMA training: optax AdamW, gradient accumulation, Orbax checkpoints with exact resume.

The run folder doubles as a model folder for generation:

    RUN_DIR/
      config.json, tokenizer.model   the model (llama_jax.checkpoint.load_model(RUN_DIR) reads the latest step)
      train_config.json              every training setting, so `--resume` needs only --run-dir
      <step>/params, opt_state, train, data   Orbax CheckpointManager items (train = step + RNG, data = position)
      metrics.jsonl, tensorboard/, loss.png
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from llama_jax import checkpoint as ckpt
from llama_jax import data as data_lib
from llama_jax import sharding as sh
from llama_jax.config import PRESETS, ConfigError, LlamaConfig

# The no-download demo (README): the "demo" model preset learns CPython's pydoc topics in minutes on 2 cores.
DEMO_TRAIN: dict[str, Any] = dict(steps=600, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=30, eval_every=100,
                                  save_every=200, log_every=20)
TRAIN_PRESETS: dict[str, dict[str, Any]] = {"demo": DEMO_TRAIN}

# Shape fields: a resumed or fine-tuned run must keep them; dtype/remat/attention_impl/scan_layers may change.
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "tie_embeddings")

TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
ITEMS = ("params", "opt_state", "train", "data")


class TrainError(ValueError):
    """A training setup that cannot run; the one-line message names the flag or file."""


class NonFiniteLoss(RuntimeError):
    """The loss, or the parameters the step produced, stopped being finite; nothing of that step was saved."""

    def __init__(self, step: int, loss: float, last_checkpoint: int | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        what = (f"loss became {loss}" if not math.isfinite(loss)
                else f"parameters became non-finite (loss was {loss:.4g})")
        kept = (f"the last good checkpoint (step {last_checkpoint}) is intact" if last_checkpoint
                else "no checkpoint was written")
        super().__init__(f"{what} at step {step}; stopped without saving, {kept}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from: a preset, a config.json, or a model folder to fine-tune (+ field overrides)."""

    preset: str | None = None
    config_file: str | None = None
    init_from: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        given = [x for x in (self.preset, self.config_file, self.init_from) if x]
        if len(given) != 1:
            raise TrainError("give exactly one of --preset, --config, --init-from")
        if self.preset and self.preset not in PRESETS:
            raise TrainError(f"--preset={self.preset!r}: expected one of {sorted(PRESETS)}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    data: str
    tokenizer: str | None = None  # default: the --init-from model's tokenizer.model
    model: ModelSpec = ModelSpec(preset="demo")
    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step, over all devices and accumulation steps
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    eval_every: int = 100
    eval_batches: int = 16  # at most this many held-out micro-batches per evaluation; 0 = all
    eval_fraction: float = 0.05
    save_every: int = 500
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    mesh_data: int = -1
    mesh_fsdp: int = 1
    mesh_tensor: int = 1
    async_checkpoint: bool = True
    peak_flops: float | None = None  # FLOP/s of all devices together; default from the device kind

    def validate(self) -> None:
        self.model.validate()
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every", "keep", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"--lr={self.lr} must be > 0 and --min-lr-ratio={self.min_lr_ratio} in [0, 1]")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise TrainError(f"--warmup-steps={self.warmup_steps}: expected 0 <= warmup < --steps={self.steps}")
        if self.clip_norm <= 0:
            raise TrainError(f"--clip-norm={self.clip_norm}: must be > 0")

    @property
    def mesh_shape(self) -> sh.MeshShape:
        return sh.MeshShape(self.mesh_data, self.mesh_fsdp, self.mesh_tensor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelSpec(**d.get("model", {}))
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TrainError(f"unknown training settings {sorted(unknown)}")
        return cls(**d)

    def replace(self, **kw: Any) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# --- model config --------------------------------------------------------------------------------------------

def resolve_model_config(spec: ModelSpec, vocab_size: int) -> LlamaConfig:
    """The LlamaConfig a run trains. Presets take the tokenizer's vocabulary; a given config must cover it."""
    overrides = dict(spec.overrides)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)})
    if unknown:
        raise TrainError(f"--set {unknown[0]}=...: not a model config field")
    try:
        if spec.preset:
            config = LlamaConfig(**{**PRESETS[spec.preset], "vocab_size": vocab_size, **overrides})
        elif spec.config_file:
            config = LlamaConfig.load_json(spec.config_file).replace(**overrides)
        else:
            config = ckpt.load_config(spec.init_from)
            changed = [k for k in SHAPE_FIELDS if k in overrides and overrides[k] != getattr(config, k)]
            if changed:
                raise TrainError(f"--init-from {spec.init_from}: cannot change {changed} of a pretrained model")
            config = config.replace(**overrides)
    except TypeError as e:  # e.g. --set n_heads=abc
        raise TrainError(f"model overrides {overrides}: {e}") from None
    if config.vocab_size < vocab_size:
        raise TrainError(f"model vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return config


def default_dtype() -> str:
    """bf16 compute where it is fast (GPU/TPU), fp32 on CPU; parameters stay fp32 either way."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# --- optimizer and steps ---------------------------------------------------------------------------------------

def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, tc.steps, tc.lr * tc.min_lr_ratio)


def _decay_mask(params):
    # No weight decay on norm gains: decaying them towards 0 fights the normalisation.
    return jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                    mask=_decay_mask))


def loss_sums(params, inputs, targets, loss_mask, *, config: LlamaConfig):
    """(sum of masked token cross-entropies, number of counted tokens), both fp32."""
    from llama_jax.model import forward

    logits, _ = forward(params, inputs, config=config)  # packed, unpadded rows: positions 0..seq-1
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum((logz - target_logits) * mask), jnp.sum(mask)


def accumulate_gradients(params, inputs, targets, loss_mask, *, config: LlamaConfig, param_shardings=None):
    """(mean gradient, mean loss, token count) of a [grad_accum, micro, seq] batch.

    Gradients of token *sums* are accumulated over micro-batches and divided by the token count of the whole
    batch once, so accumulation over 4 micro-batches of B is the same mean as one batch of 4B.
    """
    if inputs.shape[0] == 1:
        # No accumulation: differentiate the mean directly. Saves the zero-filled accumulator and the division
        # of every gradient, each a full pass over parameter-sized memory.
        def mean_loss(p):
            total, count = loss_sums(p, inputs[0], targets[0], loss_mask[0], config=config)
            return total / jnp.maximum(count, 1.0), count

        (loss, count), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return grads, loss, count

    grad_fn = jax.value_and_grad(lambda p, *b: loss_sums(p, *b, config=config), has_aux=True)

    def micro(carry, batch):
        grads, loss, count = carry
        (l, n), g = grad_fn(params, *batch)
        return (jax.tree.map(jnp.add, grads, g), loss + l, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    if param_shardings is not None:  # keep the accumulator as sharded as the parameters (FSDP memory)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    (grads, loss_sum, count), _ = jax.lax.scan(micro, init, (inputs, targets, loss_mask))
    denom = jnp.maximum(count, 1.0)
    return jax.tree.map(lambda g: g / denom, grads), loss_sum / denom, count


def train_step_fn(config: LlamaConfig, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                  param_shardings: Any) -> Callable:
    """(state, inputs, targets, loss_mask) -> (state, metrics); batch arrays are [grad_accum, micro, seq]."""

    def step(state, inputs, targets, loss_mask):
        params = state["params"]
        grads, loss, count = accumulate_gradients(params, inputs, targets, loss_mask, config=config,
                                                  param_shardings=param_shardings)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        rng, _dropout_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))  # model has no dropout yet
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.key_data(rng)}
        # A finite loss says the *old* parameters were fine; the checkpoint holds the new ones. Finite old
        # parameters and finite gradients (a finite norm) give finite AdamW updates, hence finite new parameters:
        # checking the norm spares a pass over every parameter. It is the computation the clipping step makes,
        # so XLA computes it once for both.
        grad_norm = _tree_norm(grads)
        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "params_finite": jnp.isfinite(grad_norm)}
        return new_state, metrics

    return step


# What optax.clip_by_global_norm computes: optax.tree.norm, optax.global_norm before optax 0.2.5.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def eval_step_fn(config: LlamaConfig) -> Callable:
    def step(params, inputs, targets, loss_mask):
        return loss_sums(params, inputs[0], targets[0], loss_mask[0], config=config)

    return step


# --- state and shardings -------------------------------------------------------------------------------------

def state_shardings(config: LlamaConfig, optimizer, mesh) -> dict[str, Any]:
    from llama_jax.model import init_params

    params_sh = sh.param_shardings(config, mesh)
    abstract_params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    rep = sh.replicated(mesh)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params_sh,
                                   transform_non_params=lambda _: rep)
    return {"params": params_sh, "opt_state": opt_sh, "step": rep, "rng": rep}


def abstract_state(config: LlamaConfig, optimizer, shardings) -> dict[str, Any]:
    from llama_jax.model import init_params

    def build():
        params = init_params(config, jax.random.key(0))
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(jax.random.key(0))}

    shapes = jax.eval_shape(build)
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, shardings)


def init_state(config: LlamaConfig, optimizer, shardings, seed: int, params=None) -> dict[str, Any]:
    """Fresh state: random parameters from `seed`, or the given (already placed) parameters for fine-tuning."""
    from llama_jax.model import init_params

    def build(key, params):
        init_key, state_key = jax.random.split(key)
        if params is None:
            params = init_params(config, init_key)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": jax.random.key_data(state_key)}

    in_sh = (None, None if params is None else shardings["params"])
    return jax.jit(build, in_shardings=in_sh, out_shardings=shardings)(jax.random.key(seed), params)


# --- checkpoints -----------------------------------------------------------------------------------------------

def checkpoint_manager(run_dir: Path, tc: TrainConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, enable_async_checkpointing=tc.async_checkpoint,
                                           create=True)
    return ocp.CheckpointManager(run_dir.absolute(), item_names=ITEMS, options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: dict[str, Any], data_state: dict[str, Any]) -> int:
    step = int(jax.device_get(state["step"]))
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state["params"]),
        opt_state=ocp.args.StandardSave(state["opt_state"]),
        train=ocp.args.StandardSave({"step": state["step"], "rng": state["rng"]}),
        data=ocp.args.JsonSave(data_state)))
    return step


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: dict[str, Any]):
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        train=ocp.args.StandardRestore({"step": target["step"], "rng": target["rng"]}),
        data=ocp.args.JsonRestore()))
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "step": restored["train"]["step"], "rng": restored["train"]["rng"]}
    return state, restored["data"]


def checkpoint_steps(run_dir: Path) -> list[int]:
    if not run_dir.is_dir():
        return []
    return sorted(int(p.name) for p in run_dir.iterdir() if p.name.isdigit() and (p / "params").is_dir())


# --- throughput ------------------------------------------------------------------------------------------------

# Dense bf16 peak FLOP/s per device (vendor datasheets; SXM parts for GPUs).
PEAK_FLOPS_BY_KIND = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "l40s": 362e12, "l4": 121e12,
                      "a10": 125e12, "v100": 125e12, "tpu v6": 918e12, "tpu v5p": 459e12, "tpu v5": 197e12,
                      "tpu v4": 275e12}
# CPU: fp32, AVX2 with two 8-wide FMA units at ~2.5 GHz = 2 * 8 * 2 * 2.5e9 FLOP/s per core.
CPU_PEAK_FLOPS_PER_CORE = 80e9


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 * matmul params + 12 * layers * dim * seq_len (attention).

    The input embedding is a gather, not a matmul, so it is left out unless it doubles as the output head.
    """
    matmul_params = config.num_params() - (0 if config.tie_embeddings else config.vocab_size * config.dim)
    return 6.0 * matmul_params + 12.0 * config.n_layers * config.dim * seq_len


def peak_flops(devices) -> tuple[float, str]:
    """(FLOP/s of all `devices` together, how it was decided)."""
    d = devices[0]
    if d.platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        total = CPU_PEAK_FLOPS_PER_CORE * cores * jax.process_count()
        return total, f"CPU: {cores} cores x {CPU_PEAK_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s (assumed fp32 AVX2 peak)"
    kind = d.device_kind.lower()
    for name, flops in PEAK_FLOPS_BY_KIND.items():
        if name in kind:
            return flops * len(devices), f"{d.device_kind}: {flops / 1e12:.0f} TFLOP/s bf16 dense per device"
    return float("nan"), f"unknown peak for {d.device_kind!r}; pass --peak-flops"


# --- metrics ---------------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one line per step and per evaluation) and TensorBoard events; process 0 only."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.note = None
        if not enabled:
            return
        if self.path.exists():  # drop what the interrupted run logged after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.note = "tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)"

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(run_dir: str | Path) -> Path | None:
    """RUN_DIR/loss.png: training loss (raw and smoothed) and held-out loss against step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval"]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = map(np.asarray, zip(*train))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
    window = max(1, len(losses) // 50)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=1.5, label=f"train ({window}-step mean)")
    if evals:
        es, el = zip(*evals)
        ax.plot(es, el, "o-", color="tab:orange", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class Progress:
    """A rich progress bar on a terminal; plain log lines (every --log-every steps) anywhere else."""

    def __init__(self, total: int, start: int, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in files and CI logs
        self.enabled = enabled
        self.bar = None
        if enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, info="compiling…")
            self.bar.start()

    def update(self, step: int, info: str, log_line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and log_line:
            self.console.print(f"step {step} {info}", highlight=False)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the run ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything decided before any device work: the configs, mesh shape and tokenizer, all validated."""

    tc: TrainConfig
    config: LlamaConfig
    mesh_shape: sh.MeshShape
    micro_batch: int
    tokenizer_path: Path
    resume_step: int | None  # None: a fresh run


def prepare(tc: TrainConfig, resume: bool = False) -> Setup:
    """Validates settings against the devices, tokenizer and run folder; raises before anything compiles."""
    from llama_jax.tokenizer import load_tokenizer

    tc.validate()
    run_dir = Path(tc.run_dir)
    steps_done = checkpoint_steps(run_dir)
    if steps_done and not resume:
        raise TrainError(f"--run-dir {run_dir} already holds checkpoints (latest step {steps_done[-1]}); "
                         f"pass --resume to continue it or choose a new --run-dir")
    tokenizer_path = Path(tc.tokenizer) if tc.tokenizer else None
    if tokenizer_path is None and tc.model.init_from:
        tokenizer_path = Path(tc.model.init_from) / ckpt.TOKENIZER_FILE
    if tokenizer_path is None:
        raise TrainError("--tokenizer is required (a SentencePiece or tiktoken tokenizer.model)")
    tokenizer = load_tokenizer(tokenizer_path)
    config = resolve_model_config(tc.model, tokenizer.vocab_size)
    if resume and steps_done:
        saved = ckpt.load_config(run_dir)
        changed = [f"{k}: {getattr(saved, k)} -> {getattr(config, k)}" for k in SHAPE_FIELDS
                   if getattr(saved, k) != getattr(config, k)]
        if changed:
            raise TrainError(f"{run_dir / ckpt.CONFIG_FILE}: the resumed model differs in {changed}")
    if tc.seq_len > config.max_seq_len:
        raise TrainError(f"--seq-len={tc.seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
    shape = tc.mesh_shape.resolve(jax.device_count())
    # Activations are constrained over these (kv heads and vocab may stay replicated: sharding.py falls back).
    for name, size, axis, n in (("n_heads", config.n_heads, "tensor", shape.tensor),
                                ("hidden_dim", config.hidden_dim, "tensor", shape.tensor),
                                ("dim", config.dim, "fsdp", shape.fsdp)):
        if size % n:
            raise TrainError(f"model {name}={size} is not divisible by --mesh-{axis}={n}")
    micro = sh.check_batch(tc.batch_size, tc.grad_accum, shape)
    return Setup(tc, config, shape, micro, tokenizer_path, steps_done[-1] if resume and steps_done else None)


def load_data(tc: TrainConfig, tokenizer_path: str | Path) -> tuple[data_lib.Packed, data_lib.Packed | None]:
    """(training rows, held-out rows) exactly as a run with these settings sees them."""
    from llama_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    docs = data_lib.read_documents(tc.data)
    ids = data_lib.tokenize(docs, lambda text: tok.encode(text, bos=True, eos=True))
    packed = data_lib.pack(ids, tc.seq_len, bos_id=tok.bos_id, pad_id=tok.pad_id, seed=tc.seed)
    return data_lib.split(packed, tc.eval_fraction, seed=tc.seed)


def _write_run_files(setup: Setup) -> None:
    run_dir = Path(setup.tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((ckpt.CONFIG_FILE, json.dumps(setup.config.to_dict(), indent=2) + "\n"),
                       (TRAIN_CONFIG_FILE, json.dumps(setup.tc.to_dict(), indent=2) + "\n")):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    tok_dst = run_dir / ckpt.TOKENIZER_FILE
    if not tok_dst.exists() or tok_dst.read_bytes() != setup.tokenizer_path.read_bytes():
        tmp = run_dir / f".{ckpt.TOKENIZER_FILE}.tmp"
        tmp.write_bytes(setup.tokenizer_path.read_bytes())
        os.replace(tmp, tok_dst)


def _global_batch(batch: data_lib.Batch, sharding) -> tuple[jax.Array, ...]:
    """Builds the sharded [accum, micro, seq] arrays; each process gathers only the rows its devices hold."""
    names = ("inputs", "targets", "loss_mask")
    return tuple(jax.make_array_from_callback(batch.shape, sharding, lambda idx, n=n: batch.fields(idx)[n])
                 for n in names)


@dataclasses.dataclass
class RunResult:
    final_step: int
    losses: dict[int, float]
    eval_loss: float | None
    last_checkpoint: int | None


def train(setup: Setup, *, progress: bool = True, stop_after: int | None = None,
          log: Callable[[str], None] | None = None) -> RunResult:
    """Runs (or resumes) training to `setup.tc.steps`.

    stop_after: hard-exits the process right after that step, without flushing in-flight checkpoints, the way a
    preempted or killed job dies (tests use it to check exact resume).
    """
    tc, config = setup.tc, setup.config
    run_dir = Path(tc.run_dir)
    is_main = jax.process_index() == 0
    bar = Progress(tc.steps, setup.resume_step or 0, progress and is_main)
    say = log or bar.print

    train_rows, eval_rows = load_data(tc, setup.tokenizer_path)
    if is_main:
        _write_run_files(setup)
    mesh = sh.make_mesh(setup.mesh_shape)
    optimizer = make_optimizer(tc)
    schedule = lr_schedule(tc)
    shardings = state_shardings(config, optimizer, mesh)
    bsh = sh.batch_sharding(mesh)
    rep = sh.replicated(mesh)
    manager = checkpoint_manager(run_dir, tc)
    iterator = data_lib.BatchIterator(train_rows, tc.batch_size, tc.grad_accum, seed=tc.seed)

    with sh.activate(mesh):
        if setup.resume_step is not None:
            state, data_state = restore_checkpoint(manager, setup.resume_step,
                                                   abstract_state(config, optimizer, shardings))
            iterator.restore(data_state)
            say(f"resumed {run_dir} at step {setup.resume_step}")
        else:
            params = None
            if tc.model.init_from:
                params = ckpt.load_params(tc.model.init_from, config, shardings["params"])
                say(f"initialised from {tc.model.init_from}")
            state = init_state(config, optimizer, shardings, tc.seed, params)
        train_step = jax.jit(train_step_fn(config, optimizer, schedule, shardings["params"]),
                             in_shardings=(shardings, bsh, bsh, bsh), out_shardings=(shardings, rep),
                             donate_argnums=0)
        eval_step = jax.jit(eval_step_fn(config), in_shardings=(shardings["params"], bsh, bsh, bsh),
                            out_shardings=rep)

    start = int(jax.device_get(state["step"]))
    metrics_log = MetricsLog(run_dir, start, is_main)
    if metrics_log.note:
        say(metrics_log.note)
    peak, peak_note = (tc.peak_flops, "--peak-flops") if tc.peak_flops else peak_flops(mesh.devices.flat)
    flops_tok = flops_per_token(config, tc.seq_len)
    say(f"model {config.num_params() / 1e6:.2f}M params | mesh data={setup.mesh_shape.data} "
        f"fsdp={setup.mesh_shape.fsdp} tensor={setup.mesh_shape.tensor} | batch {tc.batch_size} x "
        f"{tc.seq_len} tokens (accum {tc.grad_accum}) | {len(train_rows)} train / "
        f"{len(eval_rows) if eval_rows is not None else 0} held-out sequences | MFU peak: {peak_note}")

    preempted = {"flag": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)) \
        if _in_main_thread() else None

    losses: dict[int, float] = {}
    eval_loss = None
    last_ckpt = setup.resume_step
    window = {"t": None, "tokens": 0.0, "steps": 0}
    pending = None  # (step, metrics) of the step in flight: read one step late so the host never stalls the device

    def evaluate(step: int) -> float | None:
        if eval_rows is None:
            return None
        total, count = 0.0, 0.0
        with sh.activate(mesh):
            for batch in data_lib.eval_batches(eval_rows, setup.micro_batch, tc.eval_batches):
                s, n = jax.device_get(eval_step(state["params"], *_global_batch(batch, bsh)))
                total, count = total + float(s), count + float(n)
        loss = total / max(count, 1.0)
        metrics_log.write({"split": "eval", "step": step, "loss": loss, "perplexity": math.exp(min(loss, 700))})
        say(f"step {step}: held-out loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f}")
        return loss

    def finish(step: int, m: dict[str, Any]) -> None:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and m.pop("params_finite")):
            raise NonFiniteLoss(step, m["loss"], last_ckpt)
        losses[step] = m["loss"]
        now = time.perf_counter()
        record = {"split": "train", "step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                  "tokens": int(m["tokens"])}
        if window["t"] is None:  # the first step includes compilation: start timing after it
            window.update(t=now, tokens=0.0, steps=0)
        else:
            window["tokens"] += tc.batch_size * tc.seq_len
            window["steps"] += 1
            elapsed = now - window["t"]
            record["tokens_per_s"] = window["tokens"] / elapsed
            record["mfu"] = record["tokens_per_s"] * flops_tok / peak
            if window["steps"] >= tc.log_every:
                window.update(t=now, tokens=0.0, steps=0)
        metrics_log.write(record)
        info = f"loss {m['loss']:.4f} lr {m['lr']:.2e}"
        if "tokens_per_s" in record:
            info += f" | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%"
        bar.update(step, info, log_line=step % tc.log_every == 0)

    try:
        step = start
        while step < tc.steps:
            batch = _global_batch(next(iterator), bsh)
            with sh.activate(mesh):
                state, metrics = train_step(state, *batch)
            step += 1
            if pending is not None:
                finish(*pending)
            pending = (step, metrics)
            boundary = step % tc.save_every == 0 or step % tc.eval_every == 0 or step == tc.steps
            if boundary or preempted["flag"] or step == stop_after:
                finish(*pending)  # a checkpoint is only written after its step's loss was seen to be finite
                pending = None
            if step % tc.eval_every == 0 or step == tc.steps:
                eval_loss = evaluate(step)
            if step % tc.save_every == 0 or step == tc.steps or preempted["flag"]:
                last_ckpt = save_checkpoint(manager, state, iterator.state())
            if boundary:
                window["t"] = None  # evaluation and checkpoint time is not training throughput
            if step == stop_after:
                metrics_log.close()
                os._exit(0)
            if preempted["flag"]:
                say(f"SIGTERM: saved step {step}, stopping; run again with --resume to continue")
                break
        manager.wait_until_finished()
    except NonFiniteLoss:
        manager.wait_until_finished()  # in-flight saves are of earlier, finite steps
        raise
    finally:
        bar.close()
        metrics_log.close()
        manager.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if is_main:
        png = plot_losses(run_dir)
        if png is None:
            say("matplotlib is not installed: no loss.png (pip install matplotlib)")
    return RunResult(step, losses, eval_loss, last_ckpt)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


USER_ERRORS = (TrainError, ConfigError, ckpt.CheckpointError, data_lib.DataError, sh.ShardingError)


def user_errors() -> tuple[type[BaseException], ...]:
    from llama_jax.tokenizer import TokenizerError

    return (*USER_ERRORS, TokenizerError)

