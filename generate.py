"""Generate text with a LLaMA model folder (from convert_weights.py or train.py).

    python generate.py --checkpoint models/llama3-8b --prompt "The capital of France is" --temperature 0
    python generate.py --checkpoint DIR --prompt "Once upon" --prompt "In 1905," --max-new-tokens 64   # a batch
    python generate.py --checkpoint DIR --prompts-file prompts.txt          # one prompt per line
    python generate.py --checkpoint DIR --chat --prompt "Explain RoPE"      # Llama 2 / 3 chat format
    python generate.py --checkpoint DIR --chat                              # interactive, keeps the dialog
    python generate.py --checkpoint DIR --prompts-file book.txt --kv-dtype bfloat16   # long prompts, chunked
    python generate.py --checkpoint models/llama3-70b --mesh-tensor 8 --prompt "..."   # one 8-GPU node

Text streams to stdout as it is produced (a batch prints each completion when done); tokens/s,
time to first token and compile time go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path


class UsageError(Exception):
    """Bad command-line input, reported as one `error: ...` line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; the house style is one line
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="generate.py", description="Batch / streaming / chat generation with a LLaMA model folder.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="model folder (config.json, tokenizer.model, params/) or a training run folder (a LoRA run "
                        "folder loads the base model it records, with its adapters)")
    p.add_argument("--adapter", metavar="RUN_DIR",
                   help="LoRA adapters from a training run folder, run beside the --checkpoint weights unmerged")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", metavar="FILE", help="UTF-8 text file, one prompt per line (blank lines skipped)")
    p.add_argument("--chat", action="store_true",
                   help="wrap prompts as user messages in the chat format (Llama 3 if the tokenizer is tiktoken, "
                        "else Llama 2); with no prompt, start an interactive session")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6, Meta's default)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="after the text, each generated token's K most likely candidates with their probabilities "
                        "(the model's, before temperature and filtering); with --max-new-tokens 1: what would the "
                        "model say next?")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute and parameter dtype (default: as in config.json)")
    p.add_argument("--chunk-size", type=int, default=8, metavar="N",
                   help="tokens decoded on the device between two screen updates (default 8)")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prompt tokens run through the model at a time, which bounds a long prompt's memory "
                        "(default 512)")
    p.add_argument("--kv-dtype", choices=["float32", "bfloat16", "float16"],
                   help="the KV cache's dtype (default: the compute dtype)")
    s = p.add_argument_group("parallelism (as in train.py; without these flags, one device)")
    s.add_argument("--mesh-tensor", type=int, default=1, metavar="N",
                   help="tensor-parallel axis: heads, MLP and vocabulary split over N devices (default 1)")
    s.add_argument("--mesh-data", type=int, default=1, metavar="M", help="batch rows split over M devices (default 1)")
    s.add_argument("--coordinator", help="HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS)")
    s.add_argument("--num-processes", type=int, help="processes in the run (or JAX_NUM_PROCESSES)")
    s.add_argument("--process-id", type=int, help="this process, 0-based (or JAX_PROCESS_ID)")
    s.add_argument("--distributed-auto", action="store_true",
                   help="let jax find the cluster (TPU pod slice, SLURM, Open MPI)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Flag values in range, and the prompts to run (empty only for an interactive chat)."""
    if not args.temperature >= 0:
        raise UsageError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise UsageError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.top_logprobs <= 20:
        raise UsageError(f"--top-logprobs must be in [0, 20], got {args.top_logprobs}")
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    if args.mesh_tensor < 1 or args.mesh_data < 1:
        raise UsageError(f"--mesh-tensor and --mesh-data must be >= 1, got {args.mesh_tensor} and {args.mesh_data}")
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompts-file {path}: cannot read ({getattr(e, 'strerror', None) or e}); "
                             "expected a UTF-8 text file with one prompt per line") from None
        if not lines:
            raise UsageError(f"--prompts-file {path}: no prompts (expected one prompt per line)")
        prompts += lines
    if not prompts and not args.chat:
        raise UsageError("empty batch: give --prompt TEXT (repeatable) or --prompts-file FILE, or --chat for an "
                         "interactive session")
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prompts = check_args(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Imported after the cheap checks so that bad flags fail instantly.
    from llama_jax.adapters import AdapterError
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.config import ConfigError
    from llama_jax.generation import GenerationError
    from llama_jax.sharding import ShardingError
    from llama_jax.tokenizer import TokenizerError

    try:
        return run(args, prompts)
    except (UsageError, AdapterError, CheckpointError, ConfigError, TokenizerError, GenerationError,
            ShardingError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def run(args: argparse.Namespace, prompts: list[str]) -> int:
    import jax

    from llama_jax import sharding as sh
    from llama_jax.adapters import AdapterInfo
    from llama_jax.chat import encode_chat
    from llama_jax.checkpoint import TOKENIZER_FILE, load_config
    from llama_jax.generation import Generator
    from llama_jax.sampling import SamplingParams
    from llama_jax.tokenizer import load_tokenizer

    sh.initialize_distributed(sh.Distributed.from_env(args.coordinator, args.num_processes, args.process_id,
                                                      args.distributed_auto))
    mesh = None
    if args.mesh_data * args.mesh_tensor > 1 or jax.process_count() > 1:
        mesh = sh.make_mesh(sh.MeshShape(args.mesh_data, 1, args.mesh_tensor))
    if jax.process_index() != 0:  # every process runs the same generation; one prints it
        sys.stdout = open(os.devnull, "w")
    model_dir, adapter = Path(args.checkpoint), args.adapter
    if not model_dir.is_dir():
        raise UsageError(f"--checkpoint {model_dir}: folder not found (expected a model folder from "
                         "convert_weights.py or train.py)")
    recorded = AdapterInfo.read(model_dir)
    if recorded is not None:  # a LoRA run folder: its adapters on the base model it was trained on
        if adapter is not None:
            raise UsageError(f"--checkpoint {model_dir} is a LoRA run folder; give its base as --checkpoint")
        model_dir, adapter = Path(recorded.base), model_dir
        if not model_dir.is_dir():
            raise UsageError(f"--checkpoint {adapter}: its base model {model_dir} is not there; pass "
                             f"--checkpoint BASE --adapter {adapter}")
    config = load_config(model_dir)
    if args.dtype:
        config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    if tok.vocab_size > config.vocab_size:
        raise UsageError(f"{model_dir / TOKENIZER_FILE}: tokenizer has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {config.vocab_size}")

    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    if args.chat:
        try:
            encoded = [encode_chat(tok, [*system, {"role": "user", "content": p}]) for p in prompts]
        except ValueError as e:  # e.g. Llama 2 special tags inside a message
            raise UsageError(f"--chat: {e}") from None
    else:
        encoded = [tok.encode(p, bos=True, eos=False) for p in prompts]

    gen = Generator.from_checkpoint(model_dir, config, adapter=adapter, mesh=mesh, stop_ids=tok.stop_ids,
                                    pad_id=tok.pad_id, prefill_chunk=args.prefill_chunk, kv_dtype=args.kv_dtype)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    options = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, chunk_size=args.chunk_size)
    if encoded:
        texts, stats = complete(gen, tok, encoded, seed=args.seed, **options)
        if len(encoded) > 1:
            for i, (prompt, text) in enumerate(zip(prompts, texts)):
                print(f"--- {i + 1}: {prompt}\n{text}")
        if args.top_logprobs:
            print_candidates(gen, tok, encoded, stats["ids"], args.top_logprobs)
        report(stats)
        return 0
    return chat_repl(gen, tok, system, config.max_seq_len, seed=args.seed, **options)


def complete(gen, tok, encoded, *, seed, **options):
    """Runs one batch; a single prompt streams to stdout, a batch shows a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import Progress

    from llama_jax.chat import IncrementalDecoder

    decoders = [IncrementalDecoder(tok) for _ in encoded]
    max_new = options["max_new_tokens"]
    stats = dict(tokens=0, ttft=None, compile=0.0)
    compiled0 = gen.compile_seconds
    progress = Progress(console=Console(stderr=True), transient=True) if len(encoded) > 1 else None
    task = progress.add_task("generating", total=max_new) if progress else None
    t0 = time.perf_counter()
    with progress or contextlib.nullcontext():
        for chunk in gen.stream(encoded, seed=seed, **options):
            if stats["ttft"] is None:
                stats["ttft"] = time.perf_counter() - t0 - (gen.compile_seconds - compiled0)
            stats["tokens"] += sum(len(t) for t in chunk.tokens)
            deltas = [d.push(t) for d, t in zip(decoders, chunk.tokens)]
            if progress:
                progress.update(task, advance=max(len(t) for t in chunk.tokens))
            else:
                print(deltas[0], end="", flush=True)
    if not progress:
        print(flush=True)
    stats["compile"] = gen.compile_seconds - compiled0
    stats["ids"] = [d.ids for d in decoders]
    stats["seconds"] = time.perf_counter() - t0 - stats["compile"]
    return [d.text for d in decoders], stats


def chat_repl(gen, tok, system, max_seq_len, *, seed, **options) -> int:
    from llama_jax.chat import fit_dialog

    dialog = list(system)
    print("chat: type a message, an empty line to skip, Ctrl-D to quit", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        dialog, ids = fit_dialog(tok, [*dialog, {"role": "user", "content": line}], max_seq_len)
        if len(ids) >= max_seq_len:
            print(f"error: this message alone is {len(ids)} tokens; max_seq_len is {max_seq_len}", file=sys.stderr)
            dialog.pop()
            continue
        print("assistant> ", end="", flush=True)
        (text,), stats = complete(gen, tok, [ids], seed=seed + turn, **options)
        dialog.append({"role": "assistant", "content": text})
        report(stats)
        turn += 1


def print_candidates(gen, tok, encoded, generated, k: int) -> None:
    """For each generated token, the K most likely tokens at its position: one forward pass over prompt + output."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.model import forward

    for i, (prompt, ids) in enumerate(zip(encoded, generated)):
        if len(encoded) > 1:
            print(f"--- candidates {i + 1}")
        tokens = jnp.asarray([prompt + ids[:-1] if ids else prompt])
        logits = forward(gen.params, tokens, jnp.arange(tokens.shape[1])[None], config=gen.config, ops=gen.ops)[0]
        logprobs = np.asarray(jax.nn.log_softmax(logits[0, len(prompt) - 1:], axis=-1))
        for j, row in enumerate(logprobs[:max(1, len(ids))]):
            best = np.argsort(-row, kind="stable")[:k]
            chosen = f"{tok.decode([ids[j]])!r} " if j < len(ids) else ""
            print(f"{j + 1}: {chosen}<- " + "  ".join(f"{tok.decode([int(t)])!r} {np.exp(row[t]):.4f}" for t in best))


def report(stats) -> None:
    rate = stats["tokens"] / stats["seconds"] if stats["seconds"] > 0 else float("inf")
    print(f"{stats['tokens']} tokens in {stats['seconds']:.2f} s: {rate:.1f} tokens/s, time to first token "
          f"{stats['ttft']:.3f} s (compilation {stats['compile']:.1f} s, not counted)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
