"""The training loop: dispatch a step, log the one before, evaluate, checkpoint, stop on SIGTERM.

Each step's metrics are read one step late, while the device already runs the next, so the host never stalls
it. They are read at once only where the loop acts on them: a checkpoint is written only after its step's loss
and parameters were seen to be finite, and a run stops only with every step it took logged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import jax

from llama_jax import checkpoint as ckpt
from llama_jax import data as data_lib
from llama_jax import sharding as sh
from llama_jax.kernels import select_ops
from llama_jax.training.config import NonFiniteLoss
from llama_jax.training.metrics import MetricsLog, Throughput, flops_per_token, peak_flops, plot_losses
from llama_jax.training.progress import Progress
from llama_jax.training.setup import Setup, load_data, write_run_files
from llama_jax.training.state import (abstract_state, checkpoint_manager, init_state, restore_checkpoint,
                                      save_checkpoint, state_shardings)
from llama_jax.training.step import eval_step_fn, lr_schedule, make_optimizer, train_step_fn


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
    tc = setup.tc
    run = Run(setup, progress=progress, log=log)
    with Preemption() as preemption:
        try:
            while run.step < tc.steps:
                step = run.advance()
                stopping = preemption.requested  # read once, so every decision below agrees on it
                evaluating = tc.evaluates_at(step)
                saving = tc.saves_at(step) or stopping
                if evaluating or saving or step == stop_after:
                    run.log_pending()  # before a checkpoint: its step's loss must be seen to be finite
                if evaluating:
                    run.evaluate()
                if saving:
                    run.save()
                if evaluating or saving:
                    run.throughput.restart()  # evaluation and checkpoint time is not training throughput
                if step == stop_after:
                    run.metrics_log.close()
                    os._exit(0)  # as a killed job dies: checkpoints still being written stay unfinished
                if stopping:
                    run.say(f"SIGTERM: saved step {step}, stopping; run again with --resume to continue")
                    break
            run.manager.wait_until_finished()
        except NonFiniteLoss:
            run.manager.wait_until_finished()  # in-flight saves are of earlier, finite steps
            raise
        finally:
            run.close()
    if run.is_main and plot_losses(run.run_dir) is None:
        run.say("matplotlib is not installed: no loss.png (pip install matplotlib)")
    return RunResult(run.step, run.losses, run.eval_loss, run.last_checkpoint)


class Preemption:
    """SIGTERM sets `requested` while inside the `with`: schedulers send it before they preempt a job."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _request(self, *_: Any) -> None:
        self.requested = True

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # Python sets handlers only from there
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *_: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Run:
    """One run's state, compiled steps, data and logs, with a method for each job of the loop."""

    def __init__(self, setup: Setup, *, progress: bool, log: Callable[[str], None] | None):
        tc, config = setup.tc, setup.config
        self.tc, self.run_dir = tc, Path(tc.run_dir)
        self.is_main = jax.process_index() == 0
        self.bar = Progress(tc.steps, setup.resume_step or 0, progress and self.is_main)
        self.say = log or self.bar.print

        self.train_rows, self.eval_rows = load_data(tc, setup.tokenizer_path)
        if self.is_main:
            write_run_files(setup)
        self.mesh = sh.make_mesh(setup.mesh_shape)
        optimizer = make_optimizer(tc)
        self.lora = tc.lora
        shardings = state_shardings(config, optimizer, self.mesh, self.lora)
        self.batch_sharding = sh.batch_sharding(self.mesh)
        self.manager = checkpoint_manager(self.run_dir, tc)
        self.document_mask = tc.uses_document_mask
        self.iterator = data_lib.BatchIterator(self.train_rows, tc.batch_size, tc.grad_accum, seed=tc.seed,
                                               document_mask=self.document_mask)
        bsh, rep = self.batch_sharding, sh.replicated(self.mesh)
        fields = (bsh,) * (len(data_lib.FIELDS) + (len(data_lib.SEGMENT_FIELDS) if self.document_mask else 0))
        with sh.activate(self.mesh):
            self.state = self._initial_state(setup, optimizer, shardings)
            ops = select_ops(config)  # the kernels, chosen once for both steps
            self.train_step = jax.jit(
                train_step_fn(config, optimizer, lr_schedule(tc), shardings["params"], ops, self.lora),
                in_shardings=(shardings, *fields), out_shardings=(shardings, rep), donate_argnums=0)
            self.eval_step = jax.jit(eval_step_fn(config, ops, self.lora),
                                     in_shardings=(shardings["params"], shardings.get("base"), *fields),
                                     out_shardings=rep)

        self.step = int(jax.device_get(self.state["step"]))
        self.metrics_log = MetricsLog(self.run_dir, self.step, self.is_main)
        if self.metrics_log.note:
            self.say(self.metrics_log.note)
        peak, peak_note = (tc.peak_flops, "--peak-flops") if tc.peak_flops else peak_flops(self.mesh.devices.flat)
        self.throughput = Throughput(tc.batch_size * tc.seq_len, flops_per_token(config, tc.seq_len), peak,
                                     tc.log_every)
        share = data_lib.loss_share(self.train_rows)
        self.say(f"model {config.num_params() / 1e6:.2f}M params | mesh data={setup.mesh_shape.data} "
                 f"fsdp={setup.mesh_shape.fsdp} tensor={setup.mesh_shape.tensor} | batch {tc.batch_size} x "
                 f"{tc.seq_len} tokens (accum {tc.grad_accum}) | {len(self.train_rows)} train / "
                 f"{len(self.eval_rows) if self.eval_rows is not None else 0} held-out sequences | "
                 f"MFU peak: {peak_note}"
                 f"{'' if share is None else f' | {100 * share:.1f}% of tokens in the loss'}"
                 f"{' | document masking' if self.document_mask else ''}")

        self.micro_batch = setup.micro_batch
        self.losses: dict[int, float] = {}
        self.eval_loss: float | None = None
        self.last_checkpoint = setup.resume_step
        self.pending: tuple[int, Any] | None = None  # (step, metrics) of the step in flight

    def _initial_state(self, setup: Setup, optimizer, shardings) -> dict[str, Any]:
        """The resumed checkpoint (and data position), the --init-from parameters, or a fresh init."""
        tc, config = setup.tc, setup.config
        frozen = {}
        if self.lora is not None:  # the base weights, frozen, in --base-dtype: read at every start, never saved
            base_config = config.replace(param_dtype=tc.base_dtype) if tc.base_dtype else config
            frozen["base"] = ckpt.load_params(tc.model.init_from, base_config, shardings["base"])
        if setup.resume_step is not None:
            state, data_state = restore_checkpoint(self.manager, setup.resume_step,
                                                   abstract_state(config, optimizer, shardings, self.lora))
            self.iterator.restore(data_state)
            self.say(f"resumed {self.run_dir} at step {setup.resume_step}")
            return {**state, **frozen}
        params = None
        if tc.model.init_from and self.lora is None:
            params = ckpt.load_params(tc.model.init_from, config, shardings["params"])
        if tc.model.init_from:
            self.say(f"initialised from {tc.model.init_from}")
        return {**init_state(config, optimizer, shardings, tc.seed, params, self.lora), **frozen}

    def _batch(self, batch: data_lib.Batch) -> tuple[jax.Array, ...]:
        """The sharded [accum, micro, seq] arrays; each process gathers only the rows its devices hold, once per
        device slice for all fields."""
        parts: dict[str, dict[str, Any]] = {}

        def field(idx, name):
            key = repr(idx)  # slices are unhashable before Python 3.12
            if key not in parts:
                parts[key] = batch.fields(idx)
            return parts[key][name]

        return tuple(jax.make_array_from_callback(batch.shape, self.batch_sharding, lambda idx, n=n: field(idx, n))
                     for n in batch.names)

    def advance(self) -> int:
        """Dispatches the next step, then logs the previous one, whose metrics are ready by now."""
        batch = self._batch(next(self.iterator))
        with sh.activate(self.mesh):
            self.state, metrics = self.train_step(self.state, *batch)
        self.step += 1
        self.log_pending()
        self.pending = (self.step, metrics)
        return self.step

    def log_pending(self) -> None:
        """Waits for the step in flight and logs it; NonFiniteLoss if its loss or new parameters are not finite."""
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(m["loss"]) and m.pop("params_finite")):
            raise NonFiniteLoss(step, m["loss"], self.last_checkpoint)
        self.losses[step] = m["loss"]
        record = {"split": "train", "step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"],
                  "tokens": int(m["tokens"]), **self.throughput.step_done()}
        self.metrics_log.write(record)
        info = f"loss {m['loss']:.4f} lr {m['lr']:.2e}"
        if "tokens_per_s" in record:
            info += f" | {record['tokens_per_s']:,.0f} tok/s | MFU {100 * record['mfu']:.1f}%"
        self.bar.update(step, info, log_line=step % self.tc.log_every == 0)

    def evaluate(self) -> None:
        """Held-out loss of the current parameters (at most --eval-batches micro-batches), logged and shown."""
        if self.eval_rows is None:
            return
        total, count = 0.0, 0.0
        with sh.activate(self.mesh):
            for batch in data_lib.eval_batches(self.eval_rows, self.micro_batch, self.tc.eval_batches,
                                               self.document_mask):
                s, n = jax.device_get(self.eval_step(self.state["params"], self.state.get("base"),
                                                     *self._batch(batch)))
                total, count = total + float(s), count + float(n)
        loss = total / max(count, 1.0)
        perplexity = math.exp(min(loss, 700))
        self.metrics_log.write({"split": "eval", "step": self.step, "loss": loss, "perplexity": perplexity})
        self.say(f"step {self.step}: held-out loss {loss:.4f}, perplexity {perplexity:.2f}")
        self.eval_loss = loss

    def save(self) -> None:
        """Starts writing the current state (asynchronously unless --sync-checkpoint)."""
        self.last_checkpoint = save_checkpoint(self.manager, self.state, self.iterator.state())

    def close(self) -> None:
        self.bar.close()
        self.metrics_log.close()
        self.manager.close()
