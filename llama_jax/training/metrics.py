"""What a run reports: throughput and MFU, metrics.jsonl and TensorBoard events, and the loss plot."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.training.config import METRICS_FILE

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


class Throughput:
    """Tokens/s and MFU over a window of up to `log_every` steps, timed from the end of one step to another's.

    The first step after a restart only starts the clock: it holds compilation (the first step) or follows an
    evaluation or a checkpoint, and neither is training throughput.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, log_every: int):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.log_every = log_every
        self.restart()

    def restart(self) -> None:
        self.start: float | None = None
        self.tokens, self.steps = 0.0, 0

    def step_done(self) -> dict[str, float]:
        """{"tokens_per_s", "mfu"} since the window started; empty for the step that starts it."""
        now = time.perf_counter()
        if self.start is None:
            self.start = now
            return {}
        self.tokens += self.tokens_per_step
        self.steps += 1
        tokens_per_s = self.tokens / (now - self.start)
        if self.steps >= self.log_every:
            self.restart()
            self.start = now
        return {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * self.flops_per_token / self.peak}


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
