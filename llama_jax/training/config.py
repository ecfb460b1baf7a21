"""What a run is asked to do: the training settings, where the model comes from, and the errors a user can fix."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

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
    document_mask: bool | None = None  # attention inside each document; default: on for a prepared dataset
    # LoRA: rank 0 trains every parameter; > 0 trains adapters on --init-from's frozen weights (stored in base_dtype).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    lora_dropout: float = 0.0
    base_dtype: str | None = None

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
        if self.lora_rank < 0:
            raise TrainError(f"--lora-rank={self.lora_rank}: must be >= 0 (0 = train every parameter)")
        if self.lora_rank and not self.model.init_from:
            raise TrainError("--lora-rank needs --init-from: adapters train on a pretrained model's frozen weights")
        if self.base_dtype is not None and not self.lora_rank:
            raise TrainError("--base-dtype is for LoRA runs (--lora-rank > 0), whose base weights are frozen")
        _ = self.lora  # building it checks the --lora-* values, each error naming its flag

    @property
    def lora(self):
        """The LoRA settings, or None when every parameter trains."""
        from llama_jax.adapters import LoraConfig

        if not self.lora_rank:
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=targets, dropout=self.lora_dropout)

    @property
    def uses_document_mask(self) -> bool:
        if self.document_mask is not None:
            return self.document_mask
        from llama_jax.chat_data import is_chat_data
        from llama_jax.dataset.store import is_prepared

        # Packed chat records must not see each other; a prepared dataset knows its documents too.
        return is_prepared(self.data) or is_chat_data(self.data)

    @property
    def mesh_shape(self) -> sh.MeshShape:
        return sh.MeshShape(self.mesh_data, self.mesh_fsdp, self.mesh_tensor)

    def evaluates_at(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.steps

    def saves_at(self, step: int) -> bool:
        return step % self.save_every == 0 or step == self.steps

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


# --- errors a user can fix: the CLI prints them as one line ----------------------------------------------------

def error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


USER_ERRORS = (TrainError, ConfigError, ckpt.CheckpointError, data_lib.DataError, sh.ShardingError)


def user_errors() -> tuple[type[BaseException], ...]:
    # The tokenizer module imports sentencepiece and tiktoken at load time: loaded only to classify an error.
    from llama_jax.adapters import AdapterError
    from llama_jax.tokenizer import TokenizerError

    return (*USER_ERRORS, TokenizerError, AdapterError)
