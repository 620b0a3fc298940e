"""Loop machinery shared by sft.py and dpo.py.

Optimiser and learning-rate schedule, and the data order of each optimiser
step across processes. The step loop with gradient accumulation and a
non-finite-loss guard. Metric logging to `metrics.jsonl` and Weights & Biases.
Checkpoints that are renamed into place only once complete and that a later
run resumes exactly. The loop is independent of the objective: each
script passes a function that turns a batch into a loss and per-example
statistics.

The same code runs in one process (`python dpo.py`) and under `accelerate
launch` or `torchrun` (DDP, FSDP, DeepSpeed); docs/scaling.md has the commands.
"""

import copy
import json
import logging
import math
import netrc
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

log = logging.getLogger(__name__)

WANDB_INIT_TIMEOUT = 30  # seconds to reach the W&B server before falling back to offline
PROGRESS_INTERVAL = 0.5  # seconds between progress bar refreshes, which keeps log files short
MIXED_PRECISION_MODES = ("no", "bf16", "fp16")
TRAINER_STATE_FILE = "trainer_state.json"  # loop position saved beside accelerate's state
# Global batches per length-sorted group (`training.group_by_length`): larger groups pad
# less, but make the pairs of a batch less random.
LENGTH_GROUP_BATCHES = 50
# Data-order settings absent from checkpoints saved before the setting existed.
RUN_SETTING_DEFAULTS = {"group_by_length": False}

# A step function returns the mean loss of a micro-batch and per-example
# statistics of shape (batch,), which the loop gathers and summarises.
StepFunction = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
Summarise = Callable[[dict[str, torch.Tensor]], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite."""


class TrainingInterrupted(Exception):
    """Raised after SIGTERM or SIGINT stopped training and a checkpoint was saved."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path):
        self.signal_number = signal_number
        self.step = step
        self.checkpoint = checkpoint
        super().__init__(
            f"{signal.Signals(signal_number).name} received: stopped after step {step} and saved "
            f"{checkpoint}; continue with training.resume={checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + signal number."""
        return 128 + self.signal_number


# ---------------------------------------------------------------------------
# Run set-up
# ---------------------------------------------------------------------------


def validate_training_config(training: DictConfig, num_processes: int | None = None) -> int:
    """Check batch and precision settings; return the gradient accumulation steps.

    `training.batch_size` is the global batch: pairs (or sequences) per
    optimiser step summed over all processes and accumulation steps. Each
    process runs micro-batches of `training.micro_batch_size` (default: its
    whole share, batch_size / num_processes), so the accumulation steps are
    batch_size / (num_processes * micro_batch_size). `num_processes` defaults
    to the launcher's process count.
    """
    if num_processes is None:
        num_processes = launched_process_count()
    if training.batch_size < 1 or (training.micro_batch_size is not None
                                   and training.micro_batch_size < 1):
        raise ValueError(
            f"training.batch_size={training.batch_size} and training.micro_batch_size="
            f"{training.micro_batch_size} must be positive"
        )
    if training.batch_size % num_processes:
        raise ValueError(
            f"training.batch_size={training.batch_size} must be a multiple of the "
            f"{num_processes} processes launched, so each process gets an equal share"
        )
    micro_batch_size = micro_batch_size_per_process(training, num_processes)
    if training.batch_size % (num_processes * micro_batch_size):
        raise ValueError(
            f"training.batch_size={training.batch_size} must be a multiple of "
            f"{num_processes} processes x training.micro_batch_size={micro_batch_size}"
        )
    if training.learning_rate <= 0:
        raise ValueError(f"training.learning_rate={training.learning_rate} must be positive")
    if training.eval_every is not None and training.eval_every < 1:
        raise ValueError(
            f"training.eval_every={training.eval_every} must be a positive number of steps, "
            "or null to evaluate only before and after training"
        )
    if training.mixed_precision is not None and training.mixed_precision not in (
        MIXED_PRECISION_MODES
    ):
        raise ValueError(
            f"training.mixed_precision={training.mixed_precision!r} is not one of "
            f"{', '.join(MIXED_PRECISION_MODES)}, or null for the launcher's setting"
        )
    return training.batch_size // (num_processes * micro_batch_size)


def launched_process_count() -> int:
    """Processes started by the launcher (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def micro_batch_size_per_process(training: DictConfig, num_processes: int) -> int:
    """Pairs (or sequences) in one forward pass of one process."""
    return training.micro_batch_size or training.batch_size // num_processes


def shared_run_dir(run_dir: Path) -> Path:
    """Return the main process's run directory, the same on every process.

    Each process resolves Hydra's `${now:...}` run directory when it starts, so
    processes launched a second apart would otherwise write logs and
    checkpoint parts to different directories.
    """
    if launched_process_count() <= 1:
        return run_dir
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    # Joins the process group that the launcher set up, as Accelerator would.
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return Path(broadcast_object_list([str(run_dir)])[0])


def close_process_group() -> None:
    """Destroy the process group of a multi-process run after all processes finish.

    Without this, a process can abort at exit ("terminate called without an
    active exception") while the communication threads are still running.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def make_accelerator(training: DictConfig) -> Accelerator:
    """Create the Accelerator (device: CUDA, then MPS, then CPU) and seed every RNG.

    Gradient accumulation goes through accelerate, so DeepSpeed, which scales
    and steps gradients itself, gets the same accumulation steps. The
    scheduler is stepped once per optimiser step by the loop, not once per
    process as accelerate would by default.
    """
    accumulation_steps = validate_training_config(training)
    accelerator = Accelerator(
        mixed_precision=training.mixed_precision,
        gradient_accumulation_steps=accumulation_steps,
        step_scheduler_with_optimizer=False,
    )
    launched = launched_process_count()
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE), but accelerate set up "
            f"{accelerator.num_processes}, so each would train alone. Without a GPU, launch "
            "with `ACCELERATE_USE_CPU=1 torchrun ...`."
        )
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of each info line, from rank 0
    set_seed(training.seed)
    micro_batch_size = micro_batch_size_per_process(training, accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    log.info(
        "Device: %s, processes: %d (%s), mixed precision: %s; global batch %d = %d processes "
        "x %d accumulation steps x micro-batch %d",
        accelerator.device, accelerator.num_processes, accelerator.distributed_type.value,
        accelerator.mixed_precision, training.batch_size, accelerator.num_processes,
        accumulation_steps, micro_batch_size,
    )
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
    arguments = {
        "project": config.wandb.project,
        "entity": config.wandb.entity,
        "name": config.wandb.run_name,
        "group": config.wandb.group,
        "dir": str(run_dir),
        "config": OmegaConf.to_container(config, resolve=True),
        "settings": wandb.Settings(silent=True, console="off", init_timeout=WANDB_INIT_TIMEOUT),
    }
    if mode != "online":
        return wandb.init(mode=mode, **arguments)
    try:
        return wandb.init(mode=mode, **arguments)
    except wandb.errors.Error as error:
        log.warning(
            "W&B online logging failed (%s); logging offline to %s/wandb instead. Set "
            "WANDB_MODE=offline to skip the attempt, or wandb.enabled=false.", error, run_dir,
        )
        return wandb.init(mode="offline", **arguments)


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


# ---------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------


class GlobalBatchSampler(Sampler[list[int]]):
    """Yield this process's micro-batches of every optimiser step, without end.

    Epoch e orders the dataset by a permutation drawn from seed + e and cuts
    it into global batches of `batch_size` indices, dropping the remainder.
    Each global batch is split into `num_processes` equal slices; this process
    takes slice `process_index` and yields it as `accumulation_steps`
    micro-batches. So optimiser step k gets the same pairs whatever the process
    count and accumulation, and iteration can begin at any step
    (`start_step`), which is how a resumed run continues where it stopped.

    With `lengths` (tokens per example), batches are grouped by length: the
    kept part of each epoch's permutation is cut into groups of
    LENGTH_GROUP_BATCHES global batches, each group is sorted by length
    (longest first) and cut into global batches, and the batches of a group
    are shuffled. Pairs of similar length then share a batch and micro-batch,
    so little padding is computed. The epoch still visits the same pairs.
    """

    def __init__(self, num_examples: int, batch_size: int, num_processes: int,
                 process_index: int, accumulation_steps: int, seed: int,
                 lengths: Sequence[int] | None = None):
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(
                f"lengths has {len(lengths)} entries for {num_examples} examples; pass one "
                "length per example"
            )
        if num_examples < batch_size:
            raise ValueError(
                f"{num_examples} training pairs do not fill one batch of training.batch_size="
                f"{batch_size}; lower the batch size or use more data"
            )
        if batch_size % (num_processes * accumulation_steps):
            raise ValueError(
                f"batch_size={batch_size} is not divisible by {num_processes} processes x "
                f"{accumulation_steps} accumulation steps"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.lengths = lengths
        self.start_step = 0
        self._order_epoch: int | None = None
        self._order: list[int] = []

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // (self.num_processes * self.accumulation_steps)

    def epoch_order(self, epoch: int) -> list[int]:
        """Return the shuffled dataset indices of `epoch`, drawn from seed + epoch."""
        if self._order_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            if self.lengths is not None:
                self._order = self.group_by_length(self._order, generator)
            self._order_epoch = epoch
        return self._order

    def group_by_length(self, order: list[int], generator: torch.Generator) -> list[int]:
        """Reorder the kept part of `order` into length-sorted global batches; see the class."""
        kept_examples = self.steps_per_epoch * self.batch_size
        group_size = self.batch_size * LENGTH_GROUP_BATCHES
        grouped = []
        for start in range(0, kept_examples, group_size):
            group = order[start:min(start + group_size, kept_examples)]
            group.sort(key=lambda index: self.lengths[index], reverse=True)
            batches = [group[offset:offset + self.batch_size]
                       for offset in range(0, len(group), self.batch_size)]
            for position in torch.randperm(len(batches), generator=generator).tolist():
                grouped += batches[position]
        return grouped + order[kept_examples:]

    def step_micro_batches(self, step: int) -> list[list[int]]:
        """Return this process's micro-batches of optimiser step `step` (counted from 0)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        global_batch = self.epoch_order(epoch)[position * self.batch_size:
                                               (position + 1) * self.batch_size]
        share = self.batch_size // self.num_processes
        local = global_batch[self.process_index * share:(self.process_index + 1) * share]
        size = self.micro_batch_size
        return [local[start:start + size] for start in range(0, share, size)]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield from self.step_micro_batches(step)
            step += 1


def build_train_loader(dataset, collate_fn, training: DictConfig,
                       accelerator: Accelerator) -> DataLoader:
    """Build a loader of this process's micro-batches in the order of GlobalBatchSampler.

    The loader is not passed to `accelerator.prepare`, because accelerate
    would shard it again; the loop moves each batch to the device itself.
    With `training.group_by_length`, batches group pairs of similar length
    (`TokenizedPair.length`), which changes the data order.
    """
    lengths = None
    if training.get("group_by_length", False):
        lengths = [pair.length for pair in dataset]
    sampler = GlobalBatchSampler(
        num_examples=len(dataset),
        batch_size=training.batch_size,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        accumulation_steps=accelerator.gradient_accumulation_steps,
        seed=training.seed,
        lengths=lengths,
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)


@dataclass
class PreparedTraining:
    """The model, optimiser, schedule and loaders of a run, placed by accelerate."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: DataLoader
    eval_loader: DataLoader
    total_steps: int


def prepare_training(accelerator: Accelerator, model: torch.nn.Module, train_set, eval_set,
                     collate_fn, training: DictConfig) -> PreparedTraining:
    """Build the loaders, optimiser and learning-rate schedule, and hand them to accelerate."""
    train_loader = build_train_loader(train_set, collate_fn, training, accelerator)
    eval_loader = DataLoader(eval_set, batch_size=training.eval_batch_size,
                             collate_fn=collate_fn)
    total_steps = count_steps(len(train_set), training)
    optimizer = build_optimizer(model, training)
    scheduler = build_scheduler(optimizer, training, total_steps)
    model, optimizer, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, eval_loader, scheduler
    )
    return PreparedTraining(model, optimizer, scheduler, train_loader, eval_loader, total_steps)


# ---------------------------------------------------------------------------
# The frozen reference
# ---------------------------------------------------------------------------


def prepare_reference(accelerator: Accelerator, reference: torch.nn.Module) -> torch.nn.Module:
    """Place the frozen reference for inference: no gradients and no optimiser state.

    Under FSDP the reference is sharded like the policy, and under DeepSpeed
    ZeRO-3 it is partitioned by an inference-only engine. Otherwise each
    process keeps a replica on its device, run under the same autocast as the
    policy. Call this after `accelerator.prepare` of the policy, which fills
    DeepSpeed's "auto" settings.
    """
    reference.requires_grad_(False)
    reference.eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        # NOTE: never run here (no GPUs). The prepared reference is registered with the
        # accelerator, so save_state also writes its shards, and load_state reads them back.
        prepared = accelerator.prepare_model(reference)
        prepared.eval()
        return prepared
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if deepspeed_config["zero_optimization"]["stage"] == 3:
            return deepspeed_inference_engine(reference, deepspeed_config)
    reference.to(accelerator.device)
    if accelerator.mixed_precision != "no":
        reference.forward = accelerator.autocast()(reference.forward)
    return reference


def deepspeed_inference_engine(reference: torch.nn.Module, deepspeed_config: dict):
    """Partition the reference with ZeRO-3 and no optimiser, for forward passes only."""
    # NOTE: never run here (DeepSpeed needs GPUs); the config follows DeepSpeed's
    # documented ZeRO-3 keys, with the optimiser and scheduler sections removed.
    import deepspeed

    config = copy.deepcopy(deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    return engine


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_checkpoint(accelerator: Accelerator, model, tokenizer, target: Path,
                    extra_files: dict[str, str]) -> None:
    """Save an HF checkpoint (safetensors, tokenizer, extra text files) atomically.

    Every process must call this, because gathering FSDP or ZeRO-3 shards into
    one state dict is collective. Only the main process writes: everything goes
    to a temporary sibling directory that is renamed into place, so an
    interrupted save leaves any previous checkpoint at `target` complete. A
    LoRA policy (a peft model) is saved as its adapter.
    """
    target = Path(target)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        write_model_files(accelerator, model, tokenizer, staging, extra_files, state_dict)
        rename_into_place(staging, target)
        log.info("Saved checkpoint to %s", target)
    accelerator.wait_for_everyone()


def write_model_files(accelerator: Accelerator, model, tokenizer, directory: Path,
                      extra_files: dict[str, str], state_dict: dict) -> None:
    """Write weights (or a LoRA adapter), tokenizer and text files into `directory`."""
    accelerator.unwrap_model(model).save_pretrained(directory, state_dict=state_dict,
                                                    safe_serialization=True)
    tokenizer.save_pretrained(directory)
    for name, text in extra_files.items():
        (directory / name).write_text(text, encoding="utf-8")


def rename_into_place(staging: Path, target: Path) -> None:
    """Move the complete `staging` directory to `target`, replacing an older one there."""
    if target.exists():
        retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired)
    else:
        staging.rename(target)


def save_final_model(accelerator: Accelerator, model, tokenizer, run_dir: Path,
                     extra_files: dict[str, str], lora: DictConfig) -> None:
    """Save the trained model: full weights to `<run>/model`, or a LoRA adapter.

    A LoRA policy is saved as its adapter to `<run>/adapter` (it loads with
    `peft.PeftModel.from_pretrained`), and, when `model.lora.save_merged`, also
    with the adapter merged into the base weights to `<run>/model`.
    """
    if not lora.enabled:
        save_checkpoint(accelerator, model, tokenizer, run_dir / "model", extra_files)
        return
    save_checkpoint(accelerator, model, tokenizer, run_dir / "adapter", extra_files)
    if not lora.save_merged:
        return
    if accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        log.warning(
            "model.lora.save_merged: the weights are sharded across processes, so only the "
            "adapter was saved, to %s. Merge it on one machine with peft: "
            "PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(...)",
            run_dir / "adapter",
        )
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merged = accelerator.unwrap_model(model).merge_and_unload()
        target = run_dir / "model"
        staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
        staging.mkdir(parents=True)
        write_model_files(accelerator, merged, tokenizer, staging, extra_files,
                          merged.state_dict())
        rename_into_place(staging, target)
        log.info("Saved the merged model to %s", target)
    accelerator.wait_for_everyone()


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints in `directory`."""
    checkpoints = sorted(directory.glob("step-*"))
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old)


def save_step_checkpoint(accelerator: Accelerator, model, tokenizer, checkpoints_dir: Path,
                         trainer_state: dict, extra_files: dict[str, str], keep: int) -> Path:
    """Save a resumable checkpoint `step-NNNNNN` atomically and keep the newest `keep`.

    The directory contains an HF checkpoint (or LoRA adapter) that loads with
    `from_pretrained`, and under `state/` accelerate's `save_state` output
    (model, optimiser, scheduler, gradient scaler and every process's RNG
    states) with `trainer_state.json` (step, pairs seen and the data-order
    settings). It is written under a temporary name shared by all processes,
    since each one writes its own files, and renamed when all have finished.
    Every process must call this; it assumes a file system that all processes see.
    """
    step = trainer_state["step"]
    target = checkpoints_dir / f"step-{step:06d}"
    staging = checkpoints_dir / f".step-{step:06d}.partial"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    accelerator.save_state(str(staging / "state"))
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        write_model_files(accelerator, model, tokenizer, staging, extra_files, state_dict)
        state_file = staging / "state" / TRAINER_STATE_FILE
        state_file.write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")
        rename_into_place(staging, target)
        prune_checkpoints(checkpoints_dir, keep)
        log.info("Saved resumable checkpoint to %s", target)
    accelerator.wait_for_everyone()
    return target


# ---------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state" / TRAINER_STATE_FILE).read_text(encoding="utf-8"))


def is_resumable_checkpoint(path: Path) -> bool:
    return (path / "state" / TRAINER_STATE_FILE).is_file()


def find_resume_checkpoint(resume, outputs_dir: Path, stage: str) -> Path | None:
    """Resolve `training.resume` to a step checkpoint, or None for a fresh run.

    - null or false: start fresh.
    - true: the most recently saved checkpoint of a `stage` run ("sft" or
      "dpo") anywhere under `outputs_dir`.
    - a path: that step checkpoint, or the newest step checkpoint of that run
      directory.

    Raises FileNotFoundError, with what was searched, when nothing matches.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        candidates = [
            state_file.parent.parent
            for state_file in outputs_dir.rglob(f"checkpoints/step-*/state/{TRAINER_STATE_FILE}")
            if json.loads(state_file.read_text(encoding="utf-8")).get("stage") == stage
        ]
        if not candidates:
            raise FileNotFoundError(
                f"training.resume=true found no {stage} checkpoint under "
                f"{outputs_dir.resolve()}; checkpoints are saved every training.save_every "
                "steps and on SIGTERM or Ctrl-C. Set training.resume to a checkpoint path, "
                "or to false for a fresh run."
            )
        newest = max(candidates,
                     key=lambda path: (path / "state" / TRAINER_STATE_FILE).stat().st_mtime)
        log.info("Resuming from the newest %s checkpoint: %s", stage, newest)
        return newest

    path = Path(str(resume)).expanduser()
    if is_resumable_checkpoint(path):
        return path
    run_checkpoints = sorted(path.glob("checkpoints/step-*"))
    run_checkpoints = [checkpoint for checkpoint in run_checkpoints
                       if is_resumable_checkpoint(checkpoint)]
    if run_checkpoints:
        log.info("Resuming from the newest checkpoint of %s: %s", path, run_checkpoints[-1])
        return run_checkpoints[-1]
    raise FileNotFoundError(
        f"training.resume={resume!s} is neither a step checkpoint (a directory with "
        f"state/{TRAINER_STATE_FILE}) nor a run directory with checkpoints/step-*; "
        "point it at one, or set training.resume=true for the newest checkpoint"
    )


def check_resume_compatible(trainer_state: dict, expected: dict, checkpoint: Path) -> None:
    """Raise ValueError when the checkpoint's data order or objective differs from this run's."""
    for key, value in expected.items():
        saved = trainer_state.get(key, RUN_SETTING_DEFAULTS.get(key))
        if saved != value:
            raise ValueError(
                f"Cannot resume from {checkpoint}: it was saved with {key}="
                f"{saved!r}, but this run has {key}={value!r}, so the resumed run would "
                "not continue the original one. Resume with the settings of the original run, "
                "or start a fresh run."
            )


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


@dataclass
class LoopState:
    """Loop progress: optimiser steps taken and pairs seen."""

    step: int = 0
    examples_seen: int = 0


def load_training_state(accelerator: Accelerator, checkpoint: Path,
                        run_settings: dict) -> LoopState:
    """Restore a step checkpoint into the prepared objects; return the loop position."""
    trainer_state = read_trainer_state(checkpoint)
    check_resume_compatible(trainer_state, run_settings, checkpoint)
    accelerator.load_state(str(checkpoint / "state"))
    log.info("Resumed from %s at step %d (%d pairs seen)", checkpoint, trainer_state["step"],
             trainer_state["examples_seen"])
    return LoopState(step=trainer_state["step"], examples_seen=trainer_state["examples_seen"])


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


class StopSignals:
    """Record SIGTERM and SIGINT (Ctrl-C) instead of dying, so the loop can save and stop.

    The first signal sets `signal_number`; a second one raises KeyboardInterrupt
    at once, for a user who does not want to wait for the checkpoint. Handlers
    are installed only in the main thread (Python allows no other) and the
    previous ones are restored on exit.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signal_number, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signal_number
        log.warning("%s received: saving a checkpoint after the current step, then stopping "
                    "(send it again to stop at once without saving)",
                    signal.Signals(signal_number).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signal_number in (signal.SIGTERM, signal.SIGINT):
                self._previous[signal_number] = signal.signal(signal_number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signal_number, handler in self._previous.items():
            signal.signal(signal_number, handler)


def any_process_stopping(accelerator: Accelerator, stop_signals: StopSignals) -> bool:
    """Tell whether any process received a stop signal, so all save and stop together."""
    flag = torch.tensor([stop_signals.signal_number or 0], device=accelerator.device)
    return bool(accelerator.gather(flag).max() > 0)


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
    save_step_checkpoint: Callable[[dict], Path] | None = None,
    evaluate_first: bool = False,
    resume_from: Path | None = None,
    run_identity: dict | None = None,
) -> dict[str, float]:
    """Train for `total_steps` optimiser steps and return the final eval metrics.

    `train_loader` comes from `build_train_loader`. Each step runs the
    accelerator's gradient accumulation steps of micro-batches, clips the
    gradient norm, logs the summarised statistics of all processes with
    throughput, and stops with NonFiniteLossError before applying an update
    whose loss is NaN or infinite. `evaluate(step)` runs before training when
    `evaluate_first` (in a fresh run), every `training.eval_every` steps, and
    after the last step.

    `save_step_checkpoint(trainer_state)` saves a resumable checkpoint every
    `training.save_every` steps, and after SIGTERM or SIGINT, after which
    TrainingInterrupted is raised. `resume_from` restores such a checkpoint,
    so the run continues with the same weights, optimiser, schedule, RNG and
    data position. `run_identity` contains settings, such as the loss and its
    beta, that are saved with each checkpoint and must match on resume.
    """
    sampler: GlobalBatchSampler = train_loader.batch_sampler
    run_settings = {**(run_identity or {}),
                    "batch_size": training.batch_size, "seed": training.seed,
                    "num_examples": len(train_loader.dataset),
                    "group_by_length": sampler.lengths is not None}
    state = LoopState()
    if resume_from is not None:
        state = load_training_state(accelerator, resume_from, run_settings)
    sampler.start_step = state.step

    def trainer_state() -> dict:
        return {"step": state.step, "examples_seen": state.examples_seen,
                "total_steps": total_steps, **run_settings}

    if evaluate_first and state.step == 0:
        evaluate(state.step)

    batches = iter(train_loader)
    model.train()
    progress = tqdm(total=total_steps, initial=state.step, desc="train",
                    disable=not accelerator.is_main_process,
                    mininterval=PROGRESS_INTERVAL, dynamic_ncols=True)
    final_metrics: dict[str, float] = {}
    evaluated_at = -1
    with StopSignals() as stop_signals:
        while state.step < total_steps:
            step_metrics = train_step(accelerator, model, optimizer, scheduler, batches,
                                      step_function, summarise, training, state,
                                      run_settings["num_examples"])
            if state.step % training.log_every == 0 or state.step == total_steps:
                metrics.log("train", state.step, step_metrics)
            progress.update(1)
            progress.set_postfix(loss=f"{step_metrics['loss']:.4f}")

            saved_at = None
            if save_step_checkpoint and training.save_every and (
                state.step % training.save_every == 0
            ):
                saved_at = save_step_checkpoint(trainer_state())
            if training.eval_every and state.step % training.eval_every == 0:
                final_metrics = evaluate(state.step)
                evaluated_at = state.step
                model.train()

            if any_process_stopping(accelerator, stop_signals):
                progress.close()
                if save_step_checkpoint is None:
                    raise KeyboardInterrupt
                if saved_at is None:
                    saved_at = save_step_checkpoint(trainer_state())
                raise TrainingInterrupted(stop_signals.signal_number or signal.SIGTERM,
                                          state.step, saved_at)

    progress.close()
    if evaluated_at != state.step:
        final_metrics = evaluate(state.step)
    return final_metrics


def train_step(accelerator: Accelerator, model, optimizer, scheduler, batches, step_function,
               summarise: Summarise, training: DictConfig, state: LoopState,
               num_examples: int) -> dict[str, float]:
    """Run one optimiser step over the accumulated micro-batches; return its metrics."""
    started = time.perf_counter()
    accumulation_steps = accelerator.gradient_accumulation_steps
    parts, loss_total, token_count = [], 0.0, 0
    for _ in range(accumulation_steps):
        batch = next(batches)
        token_count += int(batch["attention_mask"].sum())  # counted on the host: no device sync
        batch = send_to_device(batch, accelerator.device)
        with accelerator.accumulate(model):
            loss, statistics = step_function(batch)
            accelerator.backward(loss)
        loss_total += loss.detach().float()
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
    token_count = int(accelerator.gather(torch.tensor([token_count],
                                                      device=accelerator.device)).sum())
    elapsed = time.perf_counter() - started
    step_metrics = summarise(gathered)
    step_metrics.update({
        # DeepSpeed clips inside its engine and may not report the norm.
        "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        "learning_rate": scheduler.get_last_lr()[0],
        "pairs_per_second": pairs / elapsed,
        "tokens_per_second": token_count / elapsed,
        "epoch": state.examples_seen / num_examples,
    })
    return step_metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """Render metrics as `name=value` pairs with four significant digits."""
    return " ".join(f"{key}={value:.4g}" for key, value in metrics.items())
