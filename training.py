"""Loop machinery shared by sft.py and dpo.py.

Optimiser and learning-rate schedule, the step loop with gradient
accumulation and a non-finite-loss guard, metric logging to `metrics.jsonl`
and Weights & Biases, and checkpoints that are renamed into place only once
complete. The loop is independent of the objective: each script
passes a function that turns a batch into a loss and per-example statistics.
"""

import contextlib
import json
import logging
import math
import netrc
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # seconds between progress bar refreshes, which keeps log files short

# A step function returns the mean loss of a micro-batch and per-example
# statistics of shape (batch,), which the loop gathers and summarises.
StepFunction = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Summarise = Callable[[dict[str, torch.Tensor]], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite."""


# ---------------------------------------------------------------------------
# Run set-up
# ---------------------------------------------------------------------------


def validate_training_config(training: DictConfig) -> int:
    """Check batch settings and return the gradient accumulation steps per optimiser step."""
    micro_batch_size = training.micro_batch_size or training.batch_size
    if training.batch_size < 1 or micro_batch_size < 1:
        raise ValueError(
            f"training.batch_size={training.batch_size} and training.micro_batch_size="
            f"{training.micro_batch_size} must be positive"
        )
    if training.batch_size % micro_batch_size:
        raise ValueError(
            f"training.batch_size={training.batch_size} must be a multiple of "
            f"training.micro_batch_size={micro_batch_size}"
        )
    if training.learning_rate <= 0:
        raise ValueError(f"training.learning_rate={training.learning_rate} must be positive")
    if training.eval_every is not None and training.eval_every < 1:
        raise ValueError(
            f"training.eval_every={training.eval_every} must be a positive number of steps, "
            "or null to evaluate only before and after training"
        )
    return training.batch_size // micro_batch_size


def make_accelerator(training: DictConfig) -> Accelerator:
    """Create the Accelerator (device: CUDA, then MPS, then CPU) and seed every RNG."""
    accelerator = Accelerator(mixed_precision=training.mixed_precision)
    set_seed(training.seed)
    log.info("Device: %s, processes: %d", accelerator.device, accelerator.num_processes)
    return accelerator


def wandb_credentials_found() -> bool:
    """Tell whether a W&B API key is in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def init_wandb(config: DictConfig, run_dir: Path, accelerator: Accelerator):
    """Start a W&B run on the main process, or return None when disabled.

    Online when credentials exist, otherwise offline with one notice line;
    never prompts. An explicit WANDB_MODE in the environment wins.
    """
    if not config.wandb.enabled or not accelerator.is_main_process:
        return None
    import wandb

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if wandb_credentials_found() else "offline"
        if mode == "offline":
            log.info(
                "No W&B credentials found: logging offline to %s/wandb "
                "(sync later with `wandb sync`, or set wandb.enabled=false)",
                run_dir,
            )
    return wandb.init(
        project=config.wandb.project,
        entity=config.wandb.entity,
        name=config.wandb.run_name,
        group=config.wandb.group,
        dir=str(run_dir),
        mode=mode,
        config=OmegaConf.to_container(config, resolve=True),
        settings=wandb.Settings(silent=True, console="off"),
    )


class MetricsLogger:
    """Write metrics to `metrics.jsonl` (one flushed line per record) and to W&B."""

    def __init__(self, run_dir: Path, wandb_run=None, enabled: bool = True):
        self.enabled = enabled
        self.wandb_run = wandb_run
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8") if enabled else None

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({f"{split}/{key}": value for key, value in metrics.items()},
                               step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


# ---------------------------------------------------------------------------
# Optimisation
# ---------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, training: DictConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; biases and norms get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=training.learning_rate, betas=tuple(training.adam_betas))


def count_steps(num_examples: int, training: DictConfig) -> int:
    """Optimiser steps in the run: max_steps when set, else full batches over all epochs."""
    steps_per_epoch = num_examples // training.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_examples} training pairs do not fill one batch of training.batch_size="
            f"{training.batch_size}; lower the batch size or use more data"
        )
    if training.max_steps is not None:
        return training.max_steps
    return math.ceil(steps_per_epoch * training.epochs)


def build_scheduler(optimizer, training: DictConfig, total_steps: int):
    """Learning-rate schedule from `training.lr_scheduler` with linear warmup."""
    return get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=min(training.warmup_steps, total_steps),
        num_training_steps=total_steps,
    )


def micro_batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Yield micro-batches forever, reshuffling each epoch with the loader's seeded generator."""
    while True:
        yield from loader


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_checkpoint(accelerator: Accelerator, model, tokenizer, target: Path,
                    extra_files: dict[str, str]) -> None:
    """Save an HF checkpoint (safetensors, tokenizer, extra text files) atomically.

    Everything is written to a temporary sibling directory and renamed into
    place, so an interrupted save leaves any previous checkpoint at `target`
    complete. Only the main process writes.
    """
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    target = Path(target)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)

    accelerator.unwrap_model(model).save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    for name, text in extra_files.items():
        (staging / name).write_text(text, encoding="utf-8")

    if target.exists():
        retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)
    log.info("Saved checkpoint to %s", target)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints in `directory`."""
    checkpoints = sorted(directory.glob("step-*"))
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old)


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@dataclass
class LoopState:
    """Where the loop is: optimiser steps taken and pairs seen."""

    step: int = 0
    examples_seen: int = 0


def concatenate_statistics(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate per-example statistics of several batches into float32 CPU tensors."""
    return {key: torch.cat([part[key].detach().float().cpu() for part in parts])
            for key in parts[0]}


def gather_statistics(accelerator: Accelerator,
                      parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate the training micro-batches' statistics of every process."""
    local = {key: torch.cat([part[key].detach().float() for part in parts]) for key in parts[0]}
    return {key: accelerator.gather(value).cpu() for key, value in local.items()}


def evaluation_statistics(accelerator: Accelerator, loader: DataLoader,
                          step_function: StepFunction) -> dict[str, torch.Tensor]:
    """Run `step_function` over the eval loader without gradients; gather every pair once.

    `gather_for_metrics` drops the duplicates that a distributed sampler adds to
    even out the last batch, so each eval pair counts exactly once.
    """
    parts = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="eval", leave=False, mininterval=PROGRESS_INTERVAL,
                          disable=not accelerator.is_main_process):
            _, statistics = step_function(batch)
            parts.append(accelerator.gather_for_metrics(statistics))
    return concatenate_statistics(parts)


def run_training(
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader: DataLoader,
    step_function: StepFunction,
    summarise: Summarise,
    evaluate: Callable[[int], dict[str, float]],
    metrics: MetricsLogger,
    training: DictConfig,
    total_steps: int,
    accumulation_steps: int,
    save_step_checkpoint: Callable[[int], None] | None = None,
    evaluate_first: bool = False,
) -> dict[str, float]:
    """Train for `total_steps` optimiser steps and return the final eval metrics.

    Each step runs `accumulation_steps` micro-batches, clips the gradient norm,
    logs the summarised statistics with throughput, and stops with
    NonFiniteLossError before applying an update whose loss is NaN or infinite.
    `evaluate(step)` runs before training when `evaluate_first`, every
    `training.eval_every` steps, and after the last step.
    """
    state = LoopState()
    if evaluate_first:
        evaluate(state.step)

    batches = micro_batches(train_loader)
    model.train()
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_main_process,
                    mininterval=PROGRESS_INTERVAL, dynamic_ncols=True)
    final_metrics: dict[str, float] = {}
    evaluated_at = -1
    while state.step < total_steps:
        started = time.perf_counter()
        parts, loss_total, token_count = [], 0.0, 0
        for micro_step in range(accumulation_steps):
            batch = next(batches)
            syncing = micro_step == accumulation_steps - 1
            context = contextlib.nullcontext() if syncing else accelerator.no_sync(model)
            with context:
                loss, statistics = step_function(batch)
                accelerator.backward(loss / accumulation_steps)
            loss_total += loss.detach().float()
            token_count += int(batch["attention_mask"].sum())
            parts.append(statistics)

        loss_value = float(loss_total) / accumulation_steps
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"Training loss is {loss_value} at step {state.step + 1}; stopping before the "
                "update so the last saved checkpoint stays intact. Lower "
                "training.learning_rate, or check the data and dpo.beta."
            )

        grad_norm = accelerator.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        gathered = gather_statistics(accelerator, parts)
        pairs = len(next(iter(gathered.values())))
        state.examples_seen += pairs
        elapsed = time.perf_counter() - started
        step_metrics = summarise(gathered)
        step_metrics.update({
            "grad_norm": float(grad_norm),
            "learning_rate": scheduler.get_last_lr()[0],
            "pairs_per_second": pairs / elapsed,
            "tokens_per_second": token_count * accelerator.num_processes / elapsed,
            "epoch": state.examples_seen / len(train_loader.dataset),
        })
        if state.step % training.log_every == 0 or state.step == total_steps:
            metrics.log("train", state.step, step_metrics)
        progress.update(1)
        progress.set_postfix(loss=f"{step_metrics['loss']:.4f}")

        if save_step_checkpoint and training.save_every and state.step % training.save_every == 0:
            save_step_checkpoint(state.step)
        if training.eval_every and state.step % training.eval_every == 0:
            final_metrics = evaluate(state.step)
            evaluated_at = state.step
            model.train()

    progress.close()
    if evaluated_at != state.step:
        final_metrics = evaluate(state.step)
    return final_metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """Render metrics as `name=value` pairs with four significant digits."""
    return " ".join(f"{key}={value:.4g}" for key, value in metrics.items())
