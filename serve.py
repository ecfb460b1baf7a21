"""Serve a LLaMA model folder over the OpenAI API, with continuous batching.

    python serve.py --checkpoint models/llama3-8b                       # http://127.0.0.1:8000/v1
    python serve.py --checkpoint DIR --max-slots 16 --max-seq-len 4096 --api-key "$KEY"
    python serve.py --checkpoint models/llama3-70b --mesh-tensor 8      # one 8-GPU node

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. SIGTERM (or Ctrl-C)
stops accepting connections, lets running requests finish for up to --shutdown-timeout seconds, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as generate.py
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(prog="serve.py", description="OpenAI-compatible server for a LLaMA model folder.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="model folder (config.json, tokenizer.model, "
                   "params/) or a training run folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-slots", type=int, default=8, metavar="N", help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a slot before new ones get HTTP 429 (default 64)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="context per slot (default: the model's)")
    p.add_argument("--prefill-budget", type=int, default=256, metavar="N",
                   help="prompt tokens prefilled per engine step, between decode steps (default 256)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--mesh-tensor", type=int, default=1, metavar="N",
                   help="tensor-parallel axis: heads, MLP and vocabulary split over N devices (default 1)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="seconds running requests may take to finish after SIGTERM (default 30)")
    p.add_argument("--no-warmup", action="store_true", help="compile on first use instead of at start-up")
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    """The FastAPI app for the flags (loads the model and compiles the engine's functions)."""
    from llama_jax import sharding as sh
    from llama_jax.checkpoint import TOKENIZER_FILE, load_config
    from llama_jax.generation import Generator
    from llama_jax.inference.batching import BatchingEngine
    from llama_jax.serving import Server, create_app
    from llama_jax.tokenizer import load_tokenizer

    model_dir = Path(args.checkpoint)
    if not model_dir.is_dir():
        raise ValueError(f"--checkpoint {model_dir}: folder not found")
    config = load_config(model_dir)
    if args.max_seq_len is not None:
        if not 1 < args.max_seq_len <= config.max_seq_len:
            raise ValueError(f"--max-seq-len must be in [2, {config.max_seq_len}] (the model's), got "
                             f"{args.max_seq_len}")
        config = config.replace(max_seq_len=args.max_seq_len)
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {config.vocab_size}")
    mesh = sh.make_mesh(sh.MeshShape(1, 1, args.mesh_tensor)) if args.mesh_tensor > 1 else None
    gen = Generator.from_checkpoint(model_dir, config, mesh=mesh, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
    engine = BatchingEngine(gen, max_slots=args.max_slots, max_queue=args.max_queue,
                            prefill_budget=args.prefill_budget)
    if not args.no_warmup:
        engine.warmup()
    name = args.model_name or model_dir.resolve().name
    return create_app(Server(engine, tok, name, api_key=args.api_key))


def main(argv=None) -> int:
    args = parse_args(argv)
    for flag in ("max_slots", "port", "prefill_budget", "mesh_tensor"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.max_queue < 0 or args.shutdown_timeout < 0:
        print("error: --max-queue and --shutdown-timeout must be >= 0", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    import uvicorn

    from llama_jax.checkpoint import CheckpointError
    from llama_jax.config import ConfigError
    from llama_jax.inference.batching import EngineError
    from llama_jax.sharding import ShardingError
    from llama_jax.tokenizer import TokenizerError

    try:
        app = build(args)
    except (ValueError, CheckpointError, ConfigError, EngineError, ShardingError, TokenizerError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn re-raises the signal it stopped on once it is done: no-op handlers make that a clean exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
