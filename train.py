#!/usr/bin/env python
"""Train or fine-tune a LLaMA model on text or a prepared dataset, on one CPU, one GPU, a GPU node or a TPU pod slice.

Examples:
  # the no-download demo in one command: data/pydoc + data/pydoc.model under the current folder (kept for the
  # next time), the demo preset trained into runs/demo, then a greedy sample for 'The "with" statement'
  python train.py --demo

  # the same demo step by step
  python -m llama_jax.train_tokenizer --pydoc-topics data/pydoc --output data/pydoc.model
  python train.py --preset demo --data data/pydoc --tokenizer data/pydoc.model --run-dir runs/demo

  # a corpus of any size: tokenised once (all cores), then read from disk with document masking
  python prepare_data.py --input corpus/ --tokenizer tokenizer.model --output data/corpus
  python train.py --preset small-100m --data data/corpus --tokenizer tokenizer.model --run-dir runs/small

  # continue an interrupted run (all settings come from RUN_DIR/train_config.json)
  python train.py --run-dir runs/demo --resume

  # fine-tune a converted Meta checkpoint, parameters sharded over 8 GPUs
  python train.py --init-from models/llama3.2-1b --data corpus/ --run-dir runs/ft --mesh-fsdp 8 --lr 2e-5

  # two hosts: run the same command on each, with --process-id 0 and 1
  python train.py ... --coordinator host0:1234 --num-processes 2 --process-id 0

The run folder loads in generation directly: generate.py --checkpoint RUN_DIR.
On SIGTERM (preemption) the current step is checkpointed and the exit code is 75; --resume continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llama_jax.config import PRESETS
    from llama_jax.training import TrainConfig

    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    m = p.add_argument_group("model (one of --preset, --config, --init-from; not needed with --resume)")
    m.add_argument("--preset", help=f"named shape: {', '.join(sorted(PRESETS))}")
    m.add_argument("--config", help="a model config.json (LlamaConfig fields)")
    m.add_argument("--init-from", metavar="MODEL_DIR",
                   help="fine-tune a model folder (e.g. a converted Meta checkpoint)")
    m.add_argument("--dtype", help="compute dtype: float32 or bfloat16 (default: bfloat16 on GPU/TPU, float32 on CPU)")
    m.add_argument("--param-dtype", help="parameter (master weight) dtype (default: float32)")
    m.add_argument("--remat", dest="remat_policy",
                   help="activation checkpointing: none, full, dots, dots_no_batch, or dots_attention (dots_no_batch "
                        "that also keeps the fused attention's output: the fastest on a GPU)")
    m.add_argument("--attention-impl", help="einsum or dot_product_attention (cuDNN flash attention on GPU); "
                   "default: dot_product_attention on GPU, einsum elsewhere")
    m.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any LlamaConfig field, e.g. --set n_layers=8 (repeatable; VALUE is JSON)")

    t = p.add_argument_group("data and run")
    t.add_argument("--demo", action="store_true",
                   help="the no-download demo: writes CPython's pydoc topics to data/pydoc and trains the "
                        "tokenizer data/pydoc.model on them (relative to the current folder; skipped when "
                        "data/pydoc.model exists), trains --preset demo into --run-dir (default runs/demo), then "
                        "prints a greedy sample. Flags given with it override the demo's settings (a --steps "
                        "shorter than its 30 warmup steps warms up for 5%% of them); --resume continues it")
    t.add_argument("--data", help="a dataset folder written by prepare_data.py (read from disk), or a text file or "
                                  "folder of .txt/.md/.rst/.jsonl files (tokenised into memory: small corpora)")
    t.add_argument("--document-mask", action=argparse.BooleanOptionalAction,
                   help="attention stays inside each document of a packed row, positions restart at each document "
                        "(default: on for a prepared dataset, off for text)")
    t.add_argument("--tokenizer", help="tokenizer.model (default: the --init-from model's)")
    t.add_argument("--run-dir", help="checkpoints, metrics and config.json go here (required without --demo)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    t.add_argument("--seed", type=int, help=f"parameter init and data order (default: {d['seed']})")

    f = p.add_argument_group("LoRA (with --init-from: adapters train, the base weights stay frozen)")
    f.add_argument("--lora-rank", type=int, help="adapter rank; 0 trains every parameter (default: 0)")
    f.add_argument("--lora-alpha", type=float, help=f"adapter scale alpha / rank (default alpha: {d['lora_alpha']})")
    f.add_argument("--lora-targets", help=f"weights to adapt, comma-separated (default: {d['lora_targets']})")
    f.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default: 0)")
    f.add_argument("--base-dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype the frozen base weights are held in (default: the model's param dtype)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help=f"optimizer steps (default: {d['steps']})")
    o.add_argument("--batch-size", type=int,
                   help=f"sequences per step, all devices together (default: {d['batch_size']})")
    o.add_argument("--grad-accum", type=int, help="split each step into this many micro-batches (default: 1)")
    o.add_argument("--seq-len", type=int, help=f"tokens per sequence (default: {d['seq_len']})")
    o.add_argument("--lr", type=float, help=f"peak learning rate (default: {d['lr']})")
    o.add_argument("--min-lr-ratio", type=float,
                   help=f"cosine floor as a fraction of --lr (default: {d['min_lr_ratio']})")
    o.add_argument("--warmup-steps", type=int, help=f"linear warmup (default: {d['warmup_steps']})")
    o.add_argument("--weight-decay", type=float,
                   help=f"AdamW decay, not applied to norms (default: {d['weight_decay']})")
    o.add_argument("--b1", type=float, help=f"Adam beta1 (default: {d['b1']})")
    o.add_argument("--b2", type=float, help=f"Adam beta2 (default: {d['b2']})")
    o.add_argument("--clip-norm", type=float, help=f"global gradient-norm clip (default: {d['clip_norm']})")

    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument("--eval-every", type=int, help=f"held-out loss every N steps (default: {d['eval_every']})")
    e.add_argument("--eval-batches", type=int,
                   help=f"held-out micro-batches per evaluation, 0 = all (default: {d['eval_batches']})")
    e.add_argument("--eval-fraction", type=float, help=f"share of sequences held out (default: {d['eval_fraction']})")
    e.add_argument("--log-every", type=int, help=f"console line every N steps (default: {d['log_every']})")
    e.add_argument("--save-every", type=int, help=f"checkpoint every N steps (default: {d['save_every']})")
    e.add_argument("--keep", type=int, help=f"checkpoints to keep (default: {d['keep']})")
    e.add_argument("--sync-checkpoint", dest="async_checkpoint", action="store_const", const=False,
                   help="write checkpoints in the foreground (default: asynchronous)")
    e.add_argument("--peak-flops", type=float, help="FLOP/s of all devices together, for MFU (default: by device)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    e.add_argument("--stop-after", type=int, metavar="STEP",
                   help="testing: exit abruptly after STEP, as a killed job would (checkpoints may be in flight)")

    s = p.add_argument_group("parallelism (mesh axes; their product must not exceed the device count)")
    s.add_argument("--mesh-data", type=int, help="data-parallel axis (default: -1 = all devices left)")
    s.add_argument("--mesh-fsdp", type=int, help="parameter-sharded data-parallel axis (default: 1)")
    s.add_argument("--mesh-tensor", type=int, help="tensor-parallel axis (default: 1)")
    s.add_argument("--coordinator", help="HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    s.add_argument("--num-processes", type=int, help="processes in the run (or JAX_NUM_PROCESSES)")
    s.add_argument("--process-id", type=int, help="this process, 0-based (or JAX_PROCESS_ID)")
    s.add_argument("--distributed-auto", action="store_true",
                   help="let jax find the cluster (TPU pod slice, SLURM, Open MPI)")
    args = p.parse_args(argv)
    if args.run_dir is None and not args.demo:
        p.error("the following arguments are required: --run-dir")
    return args


TRAIN_FLAGS = ("data", "tokenizer", "run_dir", "seed", "steps", "batch_size", "grad_accum", "seq_len", "lr",
               "min_lr_ratio", "warmup_steps", "weight_decay", "b1", "b2", "clip_norm", "eval_every",
               "eval_batches", "eval_fraction", "log_every", "save_every", "keep", "async_checkpoint",
               "peak_flops", "mesh_data", "mesh_fsdp", "mesh_tensor", "document_mask", "lora_rank", "lora_alpha",
               "lora_targets", "lora_dropout", "base_dtype")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL
MODEL_FLAGS = ("dtype", "param_dtype", "remat_policy", "attention_impl")


def model_overrides(args: argparse.Namespace) -> dict:
    from llama_jax.training import TrainError

    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise TrainError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value  # a bare string such as --set dtype=bfloat16
    return overrides


def build_config(args: argparse.Namespace):
    """TrainConfig from (saved run settings when resuming) < (preset training defaults) < explicit flags."""
    from llama_jax.kernels import default_attention_impl
    from llama_jax.training import TRAIN_CONFIG_FILE, TRAIN_PRESETS, ModelSpec, TrainConfig, TrainError, default_dtype

    explicit = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    overrides = model_overrides(args)
    saved_path = Path(args.run_dir) / TRAIN_CONFIG_FILE
    new_source = args.preset or args.config or args.init_from
    if args.resume and saved_path.is_file():
        tc = TrainConfig.from_dict(json.loads(saved_path.read_text()))
        spec = ModelSpec(args.preset, args.config, args.init_from) if new_source else tc.model
        spec = dataclasses.replace(spec, overrides={**spec.overrides, **overrides})
        return tc.replace(**explicit, model=spec)
    if not new_source:
        raise TrainError("give one of --preset, --config, --init-from (or --resume an existing --run-dir)")
    if args.data is None:
        raise TrainError("--data is required (a text file or folder)")
    if "dtype" not in overrides and not args.init_from:
        overrides["dtype"] = default_dtype()
    overrides.setdefault("attention_impl", default_attention_impl())
    spec = ModelSpec(args.preset, args.config, args.init_from, overrides)
    return TrainConfig(**{**TRAIN_PRESETS.get(args.preset or "", {}), **explicit, "model": spec})


def demo_defaults(args: argparse.Namespace) -> bool:
    """--demo: fills in the flags of the step-by-step demo commands and makes their corpus and tokenizer.

    False when that failed (the tokenizer step has printed why).
    """
    from llama_jax.training import TRAIN_CONFIG_FILE, demo

    args.run_dir = args.run_dir or demo.DEMO_RUN_DIR
    if args.resume and (Path(args.run_dir) / TRAIN_CONFIG_FILE).is_file():
        return True  # the run folder holds every setting
    if not (args.preset or args.config or args.init_from):
        args.preset = "demo"
    if args.steps is not None and args.warmup_steps is None:
        args.warmup_steps = demo.demo_warmup(args.steps)
    if args.data is None and args.tokenizer is None:
        args.data, args.tokenizer = demo.DEMO_CORPUS, demo.DEMO_TOKENIZER
        return demo.make_corpus(args.data, args.tokenizer) == 0
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from llama_jax import sharding
    from llama_jax.training import NonFiniteLoss, error_line, prepare, train, user_errors

    if args.demo and not demo_defaults(args):
        return 2
    try:
        sharding.initialize_distributed(sharding.Distributed.from_env(
            args.coordinator, args.num_processes, args.process_id, args.distributed_auto))
        setup = prepare(build_config(args), resume=args.resume)
        result = train(setup, progress=not args.no_progress, stop_after=args.stop_after)
    except user_errors() as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.no_progress:
        eval_note = f", held-out loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        last = result.losses.get(result.final_step)
        loss_note = f" loss {last:.4f}" if last is not None else ""
        print(f"done: step {result.final_step}{loss_note}{eval_note}; "
              f"checkpoint {args.run_dir}/{result.last_checkpoint}", file=sys.stderr)
    # Stopped by SIGTERM (preemption) before the last step: a non-zero code tells a scheduler to run it again.
    if result.final_step < setup.tc.steps:
        return EXIT_PREEMPTED
    if args.demo:
        from llama_jax.training import demo

        if not args.no_progress:
            print(f"greedy sample of {demo.DEMO_SAMPLE_TOKENS} tokens from {args.run_dir}:", file=sys.stderr)
        print(demo.sample(args.run_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
