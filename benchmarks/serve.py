"""Continuous batching (serve.py) against static batches (Generator), the same requests in the same run.

    python benchmarks/serve.py --preset small-100m --tokenizer ../shared/tokenizers/llama2/tokenizer.model
    python benchmarks/serve.py --preset llama3.1-8b --dtype bfloat16 --max-seq-len 4096 \
        --tokenizer ../shared/tokenizers/llama3/tokenizer.model --rate 2             # a GPU
    python benchmarks/serve.py --checkpoint models/llama3.1-8b --max-seq-len 4096 --rate 2

Requests: random token-id prompts of --min-prompt..--max-prompt tokens, greedy outputs of --min-output..
--max-output tokens, each length drawn uniformly in its range, or with --lengths lognormal from a long tail in the
same range (median a quarter of the maximum, sigma 1), as lengths in chat traffic are. Two loads for each system:
- saturation: every request sent at once; output tokens per second over the whole run, in --pairs alternating
  runs of the two systems (the ratio is the median of the pairs': a shared machine's speed drifts over minutes);
- Poisson arrivals at --rate requests/s: time to first token and inter-token latency, p50 and p90.
The server runs in a child process (compiled at start-up); the static batches run here, up to --max-slots rows
through Generator.stream, the next batch starting when the previous one ends, with compilation time excluded.
--in-process adds a row that drives the server's engine here, without HTTP: what the engine itself does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="DIR", help="model folder (default: random weights of --preset)")
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="parameter and compute dtype of the random-weights model")
    p.add_argument("--max-seq-len", type=int, metavar="N",
                   help="context per slot and per static row (default: the model's; Llama 3.1's 128k would not fit "
                        "8 slots on one GPU)")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "tokenizers" / "llama2" / "tokenizer.model"),
                   help="tokenizer for the random-weights model folder")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--poisson-requests", type=int, help="requests in the Poisson load (default: --requests)")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--min-output", type=int, default=8)
    p.add_argument("--max-output", type=int, default=256)
    p.add_argument("--lengths", choices=("uniform", "lognormal"), default="uniform",
                   help="how prompt and output lengths spread over their ranges")
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--max-slots", type=int, default=8)
    p.add_argument("--prefill-budget", type=int, default=256)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=2, help="alternating saturation runs of each system")
    p.add_argument("--in-process", action="store_true",
                   help="also drive the server's engine here, without HTTP, on the saturation load")
    return p.parse_args(argv)


def make_requests(args, count: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)

    def lengths(low: int, high: int) -> np.ndarray:
        if args.lengths == "uniform":
            return rng.integers(low, high + 1, size=count)
        return np.clip(np.round(rng.lognormal(np.log(high / 4), 1.0, size=count)), low, high).astype(int)

    return [([1, *map(int, rng.integers(3, vocab, size=int(n) - 1))], int(m))
            for n, m in zip(lengths(args.min_prompt, args.max_prompt), lengths(args.min_output, args.max_output))]


def arrivals(count: int, rate: float, seed: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, size=count))


def summary(name: str, tokens: int, seconds: float, ttft: list[float], itl: list[float]) -> dict:
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")
    return dict(system=name, tokens_per_s=tokens / seconds if seconds else 0.0, ttft_p50=pct(ttft, 50),
                ttft_p90=pct(ttft, 90), itl_p50=pct(itl, 50), itl_p90=pct(itl, 90))


# --- continuous batching: the server ---------------------------------------------------------------------------

async def one_request(client, prompt, max_tokens, delay, t0, result):
    import httpx

    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    stamps, usage = [], 0
    # logprobs=0 says how many tokens each chunk carries (the engine sends several per chunk when it runs ahead).
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and (n := len((chunk["choices"][0]["logprobs"] or {}).get("tokens", []))):
                    now = time.perf_counter()
                    # A chunk of n tokens: its tokens' arrival times spread evenly since the previous chunk.
                    start = stamps[-1] if stamps else now
                    stamps += [start + (now - start) * (k + 1) / n for k in range(n)] if stamps else [now] * n
    except httpx.HTTPError as e:
        print(f"request failed: {e}", file=sys.stderr)
    result.append((sent, stamps, usage))


async def server_load(url: str, requests, delays) -> tuple[float, list]:
    import httpx

    results: list = []
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_request(client, p, m, d, t0, results) for (p, m), d in zip(requests, delays)))
        return time.perf_counter() - t0, results


def latencies(results) -> tuple[list[float], list[float], int]:
    ttft = [stamps[0] - sent for sent, stamps, _ in results if stamps]
    itl = [b - a for _, stamps, _ in results for a, b in zip(stamps, stamps[1:])]
    return ttft, itl, sum(n for *_, n in results)


class Server:
    """serve.py in a child process, up from `with` to its end; compiled at start-up."""

    def __init__(self, args, model_dir: Path, queue: int):
        self.cmd = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", str(model_dir), "--port",
                    str(args.port), "--max-slots", str(args.max_slots), "--prefill-budget", str(args.prefill_budget),
                    "--max-queue", str(queue)]
        if args.max_seq_len:
            self.cmd += ["--max-seq-len", str(args.max_seq_len)]
        self.url = f"http://127.0.0.1:{args.port}"

    def __enter__(self) -> "Server":
        import httpx

        # Its log goes to a file: a server that fails to start says why there (a bad flag, a cache that won't fit).
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log, cwd=ROOT)
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                lines = self.log.read().strip().splitlines() or ["(no output)"]
                raise SystemExit(f"serve.py exited with {self.proc.returncode}: {lines[-1]}")
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()

    def health(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/health").json()

    def load(self, requests, delays) -> tuple[float, list]:
        return asyncio.run(server_load(self.url, requests, delays))


# --- static batches: Generator ---------------------------------------------------------------------------------

class Clock:
    """Wall time minus the Generator's compilation time: a compile is as if it never happened."""

    def __init__(self, gen):
        self.gen, self.start = gen, time.perf_counter() - gen.compile_seconds

    def __call__(self) -> float:
        return time.perf_counter() - self.gen.compile_seconds - self.start


def static_run(gen, requests, delays, slots: int, work=None) -> tuple[float, list]:
    """Serves requests in arrival order, up to `slots` at a time, each batch decoding until its longest row ends.
    `work` (a dict) counts the prompt tokens the batches computed, padding included, and their decode row-steps."""
    clock, results, i = Clock(gen), [], 0
    while i < len(requests):
        now = clock()
        if delays[i] > now:
            time.sleep(delays[i] - now)
        batch = [j for j in range(i, min(i + slots, len(requests))) if delays[j] <= max(clock(), delays[i])]
        i += len(batch)
        stamps = {j: [] for j in batch}
        prompts, longest = [requests[j][0] for j in batch], max(requests[j][1] for j in batch)
        if work is not None:
            work["prompt"] = work.get("prompt", 0) + len(batch) * gen._left_pad(prompts, longest)[0].shape[1]
            work["steps"] = work.get("steps", 0) + len(batch) * longest
        for chunk in gen.stream(prompts, max_new_tokens=longest, chunk_size=1):
            t = clock()
            for j, new in zip(batch, chunk.tokens):
                if new and len(stamps[j]) < requests[j][1]:
                    stamps[j].append(t)
        results += [(delays[j], stamps[j], len(stamps[j])) for j in batch]
    return clock(), results


def run_engine(args, gen, tok, saturation) -> dict:
    """The server's engine driven here, without HTTP: the saturation load's throughput (its TTFT is not timed)."""
    import threading

    from llama_jax.inference.batching import BatchingEngine
    from llama_jax.inference.requests import Request, RequestParams

    engine = BatchingEngine(gen, max_slots=args.max_slots, max_queue=len(saturation),
                            prefill_budget=args.prefill_budget)
    engine.warmup()
    finished, tokens, lock, done = [0], [0], threading.Lock(), threading.Event()

    def on_update(update) -> None:
        if update.final:
            with lock:
                finished[0] += 1
                tokens[0] += update.completion_tokens
                if finished[0] == len(saturation):
                    done.set()

    t0 = time.perf_counter()
    for prompt, max_tokens in saturation:
        engine.submit(Request(prompt, RequestParams(max_tokens=max_tokens, temperature=0), on_update, tok,
                              tok.stop_ids))
    engine.start()
    done.wait()
    seconds = time.perf_counter() - t0
    engine.stop()
    return summary("the same engine in-process (no HTTP)", tokens[0], seconds, [], [])


def static_saturation(gen, saturation, slots: int) -> tuple[float, int, dict]:
    """Seconds and output tokens of the saturation load as static batches, and the work they computed."""
    work: dict[str, int] = {}
    seconds, results = static_run(gen, saturation, [0.0] * len(saturation), slots, work)
    return seconds, latencies(results)[2], work


def random_model(args, folder: Path) -> Path:
    import jax

    from llama_jax.checkpoint import save_model
    from llama_jax.config import preset
    from llama_jax.model import init_params

    config = preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    save_model(folder / args.preset, init_params(config, jax.random.key(args.seed)), config, args.tokenizer)
    return folder / args.preset


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.checkpoint) if args.checkpoint else random_model(args, Path(tmp))
        from llama_jax.checkpoint import TOKENIZER_FILE, load_config
        from llama_jax.generation import Generator
        from llama_jax.tokenizer import load_tokenizer

        config = load_config(model_dir)
        if args.max_seq_len:
            config = config.replace(max_seq_len=args.max_seq_len)
        vocab = min(config.vocab_size, 32000)
        saturation = make_requests(args, args.requests, vocab, args.seed)
        poisson = make_requests(args, args.poisson_requests or args.requests, vocab, args.seed + 1)
        delays = arrivals(len(poisson), args.rate, args.seed + 2)
        tok = load_tokenizer(model_dir / TOKENIZER_FILE)
        gen = Generator.from_checkpoint(model_dir, config, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
        served, static = [], []
        with Server(args, model_dir, max(len(saturation), len(poisson))) as server:
            # Saturation in alternating pairs (the server, then the static batches): this machine's speed drifts
            # over minutes, and a pair's ratio holds where one long run of each would not.
            for _ in range(args.pairs):
                before = server.health()
                seconds, results = server.load(saturation, [0.0] * len(saturation))
                after = server.health()
                served.append(latencies(results)[2] / seconds)
                # The engine's counters over this run (absent from /health until first counted).
                engine_work = {k: after[k] - before.get(k, 0)
                               for k in ("prefill_tokens", "decode_steps", "decode_rows")}
                seconds, tokens, work = static_saturation(gen, saturation, args.max_slots)
                static.append(tokens / seconds)
            _, results = server.load(poisson, delays)
            server_row = summary("continuous batching (serve.py)", 0, 0, *latencies(results)[:2])
        _, results = static_run(gen, poisson, delays, args.max_slots)
        static_row = summary(f"static batches (Generator, <= {args.max_slots} rows)", 0, 0, *latencies(results)[:2])
        server_row["tokens_per_s"], static_row["tokens_per_s"] = float(np.median(served)), float(np.median(static))
        rows = [server_row, static_row]
        if args.in_process:
            rows.append(run_engine(args, gen, tok, saturation))
    print(f"{len(saturation)} requests at once (saturation, {args.pairs} alternating pairs), {len(poisson)} at "
          f"{args.rate}/s (Poisson); prompts {args.min_prompt}-{args.max_prompt} tokens, outputs {args.min_output}-"
          f"{args.max_output} ({args.lengths}; mean {np.mean([len(p) for p, _ in saturation]):.0f} and "
          f"{np.mean([m for _, m in saturation]):.0f}), greedy; {args.max_slots} slots; {os.cpu_count()} CPUs")
    print("| system | output tokens/s (saturation, median) | TTFT p50 / p90 (ms) | inter-token p50 / p90 (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        ms = lambda a, b: "-" if np.isnan(r[a]) else f"{r[a]:.0f} / {r[b]:.0f}"  # noqa: E731
        print(f"| {r['system']} | {r['tokens_per_s']:.1f} | {ms('ttft_p50', 'ttft_p90')} | "
              f"{ms('itl_p50', 'itl_p90')} |")
    ratios = [a / b for a, b in zip(served, static)]
    print(f"continuous / static throughput: {np.median(ratios):.2f}x (median of the pairs: "
          f"{', '.join(f'{x:.2f}x' for x in ratios)})"
          + (f"; the engine without HTTP: {rows[2]['tokens_per_s'] / static_row['tokens_per_s']:.2f}x"
             if args.in_process else ""))
    prompts = sum(len(p) for p, _ in saturation)
    print(f"the engine computed {engine_work['prefill_tokens'] / prompts:.2f}x the prompt tokens (chunk padding) and "
          f"kept {engine_work['decode_rows'] / engine_work['decode_steps']:.2f} of {args.max_slots} rows busy per "
          "decode step")
    # What the static batches computed beyond the requests themselves: at equal cost per prompt token and per
    # decode row-step, a scheduler that wastes nothing is faster by a ratio between these two.
    prompt_waste = work["prompt"] / prompts
    step_waste = work["steps"] / sum(m for _, m in saturation)
    low, high = sorted((prompt_waste, step_waste))
    print(f"static batches computed {prompt_waste:.2f}x the prompt tokens (padding) and {step_waste:.2f}x the "
          f"decode row-steps (rows waiting for the longest) of the requests: at equal cost per token, the scheduling "
          f"bound is {low:.2f}x-{high:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
