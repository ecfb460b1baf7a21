"""Everything decided before any device work: settings checked against the devices, tokenizer and run folder."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax

from llama_jax import checkpoint as ckpt
from llama_jax import data as data_lib
from llama_jax import sharding as sh
from llama_jax.adapters import ADAPTER_FILE, AdapterInfo, base_identity
from llama_jax.chat_data import encode_dialogs, is_chat_data, read_dialogs
from llama_jax.config import LlamaConfig
from llama_jax.dataset.store import TokenDataset, TokenRows, file_md5, is_prepared
from llama_jax.training.config import SHAPE_FIELDS, TRAIN_CONFIG_FILE, TrainConfig, TrainError, resolve_model_config
from llama_jax.training.state import checkpoint_steps


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
    if tc.lora is not None and resume and steps_done:
        _check_adapter_run(tc, run_dir)
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
    if is_prepared(tc.data):  # its manifest, tokenizer and shard sizes are checked now, before anything compiles
        TokenRows(TokenDataset(tc.data, tokenizer_md5=file_md5(tokenizer_path)), tc.seq_len)
    return Setup(tc, config, shape, micro, tokenizer_path, steps_done[-1] if resume and steps_done else None)


def load_data(tc: TrainConfig, tokenizer_path: str | Path) -> tuple[data_lib.Rows, data_lib.Rows | None]:
    """(training rows, held-out rows) exactly as a run with these settings sees them: a prepared dataset read
    through memory maps, or text tokenised into memory."""
    from llama_jax.tokenizer import load_tokenizer

    if is_prepared(tc.data):
        rows = TokenRows(TokenDataset(tc.data, tokenizer_md5=file_md5(tokenizer_path)), tc.seq_len)
        return data_lib.split(rows, tc.eval_fraction, seed=tc.seed)
    tok = load_tokenizer(tokenizer_path)
    masks = None
    if is_chat_data(tc.data):  # loss on the assistant's tokens only
        ids, masks = encode_dialogs(tok, read_dialogs(tc.data))
    else:
        ids = data_lib.tokenize(data_lib.read_documents(tc.data), lambda text: tok.encode(text, bos=True, eos=True))
    packed = data_lib.pack(ids, tc.seq_len, bos_id=tok.bos_id, pad_id=tok.pad_id, seed=tc.seed, masks=masks)
    return data_lib.split(packed, tc.eval_fraction, seed=tc.seed)


def _check_adapter_run(tc: TrainConfig, run_dir: Path) -> None:
    """A LoRA run resumes only on the base model, and with the LoRA settings, its adapters were trained with."""
    info = AdapterInfo.read(run_dir)
    if info is None:
        raise TrainError(f"--run-dir {run_dir}: its checkpoints are not LoRA adapters (no {ADAPTER_FILE})")
    if info.lora != tc.lora:
        raise TrainError(f"{run_dir / ADAPTER_FILE}: the run's LoRA settings {info.lora} differ from {tc.lora}")
    info.check_base(tc.model.init_from, run_dir)


def write_run_files(setup: Setup) -> None:
    """config.json, train_config.json and tokenizer.model, each replaced atomically: the run folder is a model
    folder and `--resume` needs nothing else."""
    run_dir = Path(setup.tc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((ckpt.CONFIG_FILE, json.dumps(setup.config.to_dict(), indent=2) + "\n"),
                       (TRAIN_CONFIG_FILE, json.dumps(setup.tc.to_dict(), indent=2) + "\n")):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
    if setup.tc.lora is not None and not (run_dir / ADAPTER_FILE).exists():
        base = Path(setup.tc.model.init_from)
        AdapterInfo(str(base.resolve()), base_identity(base), setup.tc.lora).save(run_dir)
    tok_dst = run_dir / ckpt.TOKENIZER_FILE
    if not tok_dst.exists() or tok_dst.read_bytes() != setup.tokenizer_path.read_bytes():
        tmp = run_dir / f".{ckpt.TOKENIZER_FILE}.tmp"
        tmp.write_bytes(setup.tokenizer_path.read_bytes())
        os.replace(tmp, tok_dst)
