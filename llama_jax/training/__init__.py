"""Sharded LLaMA training: optax AdamW, gradient accumulation, Orbax checkpoints with exact resume.

The run folder doubles as a model folder for generation:

    RUN_DIR/
      config.json, tokenizer.model   the model (llama_jax.checkpoint.load_model(RUN_DIR) reads the latest step)
      train_config.json              every training setting, so `--resume` needs only --run-dir
      <step>/params, opt_state, train, data   Orbax CheckpointManager items (train = step + RNG, data = position)
      metrics.jsonl, tensorboard/, loss.png

One file per job: config (settings and errors), step (the jitted step), state (shardings and checkpoints),
metrics and progress (what a run reports), setup (checks before device work), loop (the run itself), demo.
"""

from llama_jax.training.config import (DEMO_TRAIN, METRICS_FILE, SHAPE_FIELDS, TRAIN_CONFIG_FILE, TRAIN_PRESETS,
                                       USER_ERRORS, ModelSpec, NonFiniteLoss, TrainConfig, TrainError, default_dtype,
                                       error_line, resolve_model_config, user_errors)
from llama_jax.training.loop import Preemption, Run, RunResult, train
from llama_jax.training.metrics import (CPU_PEAK_FLOPS_PER_CORE, PEAK_FLOPS_BY_KIND, MetricsLog, Throughput,
                                        flops_per_token, peak_flops, plot_losses, read_metrics)
from llama_jax.training.progress import Progress
from llama_jax.training.setup import Setup, load_data, prepare, write_run_files
from llama_jax.training.state import (ITEMS, abstract_state, checkpoint_manager, checkpoint_steps, init_state,
                                      restore_checkpoint, save_checkpoint, state_shardings)
from llama_jax.training.step import (accumulate_gradients, eval_step_fn, loss_sums, lr_schedule, make_optimizer,
                                     train_step_fn)

__all__ = [
    # settings and errors
    "DEMO_TRAIN", "METRICS_FILE", "SHAPE_FIELDS", "TRAIN_CONFIG_FILE", "TRAIN_PRESETS", "USER_ERRORS", "ModelSpec",
    "NonFiniteLoss", "TrainConfig", "TrainError", "default_dtype", "error_line", "resolve_model_config",
    "user_errors",
    # the step
    "accumulate_gradients", "eval_step_fn", "loss_sums", "lr_schedule", "make_optimizer", "train_step_fn",
    # state and checkpoints
    "ITEMS", "abstract_state", "checkpoint_manager", "checkpoint_steps", "init_state", "restore_checkpoint",
    "save_checkpoint", "state_shardings",
    # reporting
    "CPU_PEAK_FLOPS_PER_CORE", "PEAK_FLOPS_BY_KIND", "MetricsLog", "Progress", "Throughput", "flops_per_token",
    "peak_flops", "plot_losses", "read_metrics",
    # the run
    "Preemption", "Run", "RunResult", "Setup", "load_data", "prepare", "train", "write_run_files",
]
