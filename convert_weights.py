"""Convert Meta's LLaMA download (consolidated.NN.pth + params.json + tokenizer.model) to an Orbax model folder.

    python convert_weights.py --input ~/llama-3-8b --output models/llama3-8b [--dtype bf16]
    python convert_weights.py --input hf-llama-folder --output models/x            # HF safetensors, auto-detected
    python convert_weights.py --to-meta --input models/llama3-8b --output meta/ [--shards 2]
    python convert_weights.py --to-hf --input models/llama3-8b --output hf/ [--max-shard-size 5GB]

The output folder loads with `llama_jax.checkpoint.load_model` and `generate.py --checkpoint DIR`.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="convert_weights.py",
        description="Convert Meta LLaMA 2/3 checkpoints (or Hugging Face safetensors) to an Orbax model folder, "
                    "layer by layer, and export model folders back to Meta's layout with --to-meta or to a "
                    "Hugging Face folder with --to-hf.")
    p.add_argument("--input", required=True, metavar="DIR",
                   help="Meta download folder (params.json + consolidated.NN.pth), a Hugging Face folder "
                        "(config.json + model*.safetensors), or with --to-meta / --to-hf a model folder")
    p.add_argument("--output", required=True, metavar="DIR", help="folder to create (must not exist)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16", "bfloat16", "float32",
                                                       "float16"],
                   help="stored parameter dtype (default: that of the input tensors)")
    p.add_argument("--family", choices=["llama2", "llama3", "llama3.1", "llama3.2"],
                   help="only where params.json is ambiguous: llama3.1 (rope scaling x8) vs llama3.2 (x32) for "
                        "use_scaled_rope models; also picks the default max_seq_len")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="context length to record in config.json (default by family: 4096 / 8192 / 131072)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model to copy (default: INPUT/tokenizer.model, INPUT/original/, or the parent)")
    p.add_argument("--format", default="auto", choices=["auto", "meta", "hf"], help="input format (default: detect)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the checklist.chk md5 check")
    export = p.add_mutually_exclusive_group()
    export.add_argument("--to-meta", action="store_true", help="export the model folder --input to Meta's layout")
    export.add_argument("--to-hf", action="store_true",
                        help="export the model folder --input to a Hugging Face LlamaForCausalLM folder "
                             "(safetensors, config, tokenizer.json with the chat template)")
    p.add_argument("--shards", type=int, default=1, metavar="N", help="with --to-meta: model-parallel shards")
    p.add_argument("--embedding-split", default="auto", choices=["auto", "vocab", "dim"],
                   help="with --to-meta: shard tok_embeddings on vocab (Llama 3) or dim (Llama 2); auto: by rope_theta")
    p.add_argument("--adapter", metavar="RUN_DIR",
                   help="merge a LoRA run's adapters into the model folder --input: writes a model folder, or with "
                        "--to-hf a Hugging Face folder")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="with --to-hf: largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help is instant.
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.config import ConfigError
    from llama_jax.convert import ConvertError, convert, describe, export_hf, export_meta, merge_adapter, parse_size

    try:
        if args.adapter and args.to_meta:
            raise ConvertError("--adapter with --to-meta: merge first (--adapter without --to-meta), then export")
        if args.adapter and not args.to_hf:
            out = merge_adapter(args.input, args.adapter, args.output, overwrite=args.overwrite,
                                progress=not args.quiet)
            print(f"wrote {out} ({args.input} with the adapters of {args.adapter} merged)")
        elif args.to_meta:
            out = export_meta(args.input, args.output, shards=args.shards, embedding_split=args.embedding_split,
                              overwrite=args.overwrite, progress=not args.quiet)
            print(f"wrote {out} (Meta layout, {args.shards} shard(s))")
        elif args.to_hf:
            out = export_hf(args.input, args.output, adapter=args.adapter,
                            max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                            progress=not args.quiet)
            print(f"wrote {out} (Hugging Face LlamaForCausalLM, safetensors)")
        else:
            result = convert(args.input, args.output, dtype=args.dtype, family=args.family,
                             max_seq_len=args.max_seq_len, tokenizer=args.tokenizer, overwrite=args.overwrite,
                             verify=not args.no_verify, source_format=args.format, progress=not args.quiet)
            print(describe(result))
    except (ConvertError, ConfigError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
