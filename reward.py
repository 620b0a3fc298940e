"""Reward models: train a Bradley-Terry reward model, or score a preference set with one.

    uv run python reward.py                                # train from the newest SFT run
    uv run python reward.py reward.job=score               # score with the newest reward model
    uv run python reward.py reward.job=score reward.model=<path or hub id> \\
        dataset=hh_rlhf dataset.path=<preference files> reward.relabel=true
    uv run python dpo.py dpo.loss_type=rebel dataset.path=<score run dir>/scored

train: a sequence-classification model with a one-output head, started from
the SFT checkpoint (`model.name`, or the newest SFT run under `outputs_dir`),
is fitted with the Bradley-Terry loss of losses.py. The reward of a sequence
is the head's output at its last non-pad token. The run reports held-out
pairwise accuracy and saves a checkpoint that
`AutoModelForSequenceClassification.from_pretrained` loads to `<run dir>/model`.

score: every usable pair of the `dataset` source is scored without gradients
and written, with all original columns plus `chosen_reward` and
`rejected_reward`, to `reward.output` (`train.parquet`, `test.parquet` when the
source has a test split, and `scoring.json` with the row counts). The output
directory appears only once complete. Batches are formed from the data alone,
so on CPU a rerun gives identical rewards (tests/test_reward.py checks this),
and an interrupted run is simply rerun.
"""

import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification

import data
import losses
import models
import training

log = logging.getLogger("reward")

JOBS = ("train", "score")
STAGE = "reward"  # stage name in resumable checkpoints, which training.resume=true looks for
REWARD_CONFIG_FILE = "reward_config.yaml"  # saved beside the weights; marks a reward model
SCORING_SUMMARY_FILE = "scoring.json"
# Columns that belong to one response each, swapped together when a pair is relabelled.
RESPONSE_COLUMNS = (
    ("chosen", "rejected"),
    ("chosen_reward", "rejected_reward"),
    ("original_chosen_reward", "original_rejected_reward"),
)


class RewardModelError(ValueError):
    """Raised for a reward model that cannot score, with the model and the fix."""


# ---------------------------------------------------------------------------
# Configuration and checkpoints
# ---------------------------------------------------------------------------


def validate_reward_config(config: DictConfig) -> None:
    """Check the reward settings before any data or model loads."""
    if config.reward.job not in JOBS:
        raise ValueError(
            f"reward.job={config.reward.job!r} is not one of {', '.join(JOBS)}, "
            "e.g. reward.job=score"
        )
    if config.reward.batch_size < 1:
        raise ValueError(f"reward.batch_size={config.reward.batch_size} must be positive")


def newest_reward_model(outputs_dir: Path) -> Path | None:
    """Find the most recently saved reward model under `outputs_dir`, or None."""
    if not outputs_dir.is_dir():
        return None
    candidates = [
        marker.parent
        for marker in outputs_dir.rglob(f"model/{REWARD_CONFIG_FILE}")
        if models.is_checkpoint_dir(marker.parent)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda path: (path / REWARD_CONFIG_FILE).stat().st_mtime)


def resolve_start_checkpoint(config: DictConfig) -> str:
    """Return model.name, or else the newest SFT run, as the start of a new reward model."""
    if config.model.name:
        return config.model.name
    outputs_dir = Path(config.outputs_dir)
    checkpoint = models.newest_sft_checkpoint(outputs_dir, config.model.label,
                                              config.dataset.label)
    if checkpoint is None:
        raise FileNotFoundError(
            f"No SFT checkpoint found under {outputs_dir.resolve()}. Run `python sft.py` "
            "first (with the same model and dataset overrides), or set model.name to a "
            "causal LM checkpoint path or hub id."
        )
    log.info("Starting the reward model from the newest SFT checkpoint: %s", checkpoint)
    return str(checkpoint)


def resolve_reward_model(config: DictConfig) -> str:
    """Return reward.model, or else the newest reward run, as the model to score with."""
    if config.reward.model:
        return config.reward.model
    outputs_dir = Path(config.outputs_dir)
    checkpoint = newest_reward_model(outputs_dir)
    if checkpoint is None:
        raise FileNotFoundError(
            f"No reward model found under {outputs_dir.resolve()}. Train one with "
            "`python reward.py reward.job=train`, or set reward.model to the path or hub id "
            "of a sequence-classification reward model."
        )
    log.info("Scoring with the newest reward model: %s", checkpoint)
    return str(checkpoint)


def check_reward_head(name_or_path: str, trust_remote_code: bool) -> None:
    """Raise RewardModelError unless the checkpoint is a sequence classifier with one output.

    Reads only the model config, so a wrong model fails before any weights load.
    """
    model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    architectures = model_config.architectures or []
    if architectures and not any(name.endswith("ForSequenceClassification")
                                 for name in architectures):
        raise RewardModelError(
            f"reward.model={name_or_path!r} is a {', '.join(architectures)} checkpoint, not a "
            "reward model, and scoring with it would use a randomly initialised head. Train "
            "one with `python reward.py reward.job=train`, or give a sequence-classification "
            "checkpoint."
        )
    if model_config.num_labels != 1:
        raise RewardModelError(
            f"reward.model={name_or_path!r} has a head with {model_config.num_labels} outputs "
            f"(labels {list(model_config.id2label.values())}); a reward model has exactly one. "
            "Use a reward model trained with num_labels=1, such as one from reward.job=train."
        )


def load_reward_model(name_or_path: str, tokenizer, model_config: DictConfig,
                      num_labels: int | None = None):
    """Load a sequence-classification model and tell it the tokenizer's pad id.

    The model reads each sequence's reward at its last token that is not
    `config.pad_token_id`, whichever side the padding is on. When the pad
    token is EOS (as for Pythia), that is the last response token before EOS.
    Pass num_labels=1 to put a new one-output head on a causal LM checkpoint.
    """
    options = {} if num_labels is None else {"num_labels": num_labels}
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path,
        dtype=models.torch_dtype(model_config.dtype),
        trust_remote_code=model_config.trust_remote_code,
        **options,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        log.info("The pad token is EOS, so rewards are read at the last token before EOS")
    return model


# ---------------------------------------------------------------------------
# Rewards of a batch
# ---------------------------------------------------------------------------


def sequence_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the float32 reward of every sequence in a batch, shape (sequences,)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if logits.shape[-1] != 1:
        raise RewardModelError(
            f"The reward head returned {logits.shape[-1]} outputs per sequence; a reward model "
            "has exactly one (num_labels=1)."
        )
    return logits[:, 0].float()


def reward_step(model, batch: dict[str, torch.Tensor]):
    """Score chosen and rejected in one forward pass and compute the Bradley-Terry loss.

    The batch is a PreferenceCollator batch: B chosen rows, then B rejected rows.
    Returns the mean loss and per-pair statistics of shape (B,).
    """
    rewards = sequence_rewards(model, batch)
    pairs = len(rewards) // 2
    chosen_rewards, rejected_rewards = rewards[:pairs], rewards[pairs:]
    pair_losses = losses.bradley_terry_loss(chosen_rewards, rejected_rewards)
    statistics = {
        "loss": pair_losses.detach(),
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
    }
    return pair_losses.mean(), statistics


def summarise_rewards(statistics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average per-pair statistics. Accuracy is the share of pairs whose chosen reward is higher."""
    margins = statistics["rewards/chosen"] - statistics["rewards/rejected"]
    return {
        "loss": float(statistics["loss"].mean()),
        "accuracy": float((margins > 0).float().mean()),
        "rewards/chosen": float(statistics["rewards/chosen"].mean()),
        "rewards/rejected": float(statistics["rewards/rejected"].mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/margins_std": float(margins.std()) if len(margins) > 1 else 0.0,
    }


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def train_reward_model(config: DictConfig, run_dir: Path) -> dict[str, float]:
    """Fit a reward model on the dataset's pairs and return the final eval metrics."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    training.validate_training_config(config.training)
    resume_from = training.find_resume_checkpoint(config.training.resume,
                                                  Path(config.outputs_dir), STAGE)
    checkpoint = resolve_start_checkpoint(config)
    splits = data.load_preference_data(config.dataset, config.training.seed)

    accelerator = training.make_accelerator(config.training)
    tokenizer = models.load_tokenizer(config.model.tokenizer or checkpoint,
                                      config.model.trust_remote_code)
    model = load_reward_model(checkpoint, tokenizer, config.model, num_labels=1)
    if config.training.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    log.info("Reward model: %s with a new one-output head, %.2fM parameters",
             type(model).__name__,
             sum(parameter.numel() for parameter in model.parameters()) / 1e6)

    max_length, max_prompt_length = config.dataset.max_length, config.dataset.max_prompt_length
    train_set = data.tokenize_pairs(splits.train, tokenizer, max_length, max_prompt_length)
    eval_set = data.tokenize_pairs(splits.eval, tokenizer, max_length, max_prompt_length)

    collator = data.PreferenceCollator(tokenizer.pad_token_id)
    prepared = training.prepare_training(accelerator, model, train_set, eval_set, collator,
                                         config.training)
    model, optimizer, scheduler = prepared.model, prepared.optimizer, prepared.scheduler
    train_loader, eval_loader = prepared.train_loader, prepared.eval_loader
    total_steps = prepared.total_steps

    metrics = training.MetricsLogger(
        run_dir, training.init_wandb(config, run_dir, accelerator), accelerator.is_main_process
    )
    resolved_config = OmegaConf.to_yaml(config, resolve=True)

    def step_function(batch):
        return reward_step(model, batch)

    def evaluate_and_log(step: int) -> dict[str, float]:
        model.eval()
        statistics = training.evaluation_statistics(accelerator, eval_loader, step_function)
        eval_metrics = summarise_rewards(statistics)
        metrics.log("eval", step, eval_metrics)
        log.info("eval step %d: %s", step, training.format_metrics(eval_metrics))
        return eval_metrics

    def save_step_checkpoint(trainer_state: dict) -> Path:
        return training.save_step_checkpoint(
            accelerator, model, tokenizer, run_dir / "checkpoints",
            {"stage": STAGE, **trainer_state}, {"reward_step_config.yaml": resolved_config},
            config.training.keep_checkpoints,
        )

    log.info("Training the reward model for %d steps of %d pairs", total_steps,
             config.training.batch_size)
    try:
        final_metrics = training.run_training(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            step_function=step_function,
            summarise=summarise_rewards,
            evaluate=evaluate_and_log,
            metrics=metrics,
            training=config.training,
            total_steps=total_steps,
            save_step_checkpoint=save_step_checkpoint,
            evaluate_first=True,
            resume_from=resume_from,
        )
        training.save_checkpoint(accelerator, model, tokenizer, run_dir / "model",
                                 {REWARD_CONFIG_FILE: resolved_config})
    finally:
        metrics.close()

    wall_time = time.perf_counter() - started
    if accelerator.is_main_process:
        summary = {"checkpoint": str(run_dir / "model"), "wall_time_seconds": wall_time,
                   **final_metrics}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("Final eval: %s (%.0f s)", training.format_metrics(final_metrics), wall_time)
    log.info("Held-out pairwise accuracy: %.4f on %d pairs", final_metrics["accuracy"],
             len(eval_set))
    log.info("Reward model: %s (score with reward.job=score reward.model=%s)",
             run_dir / "model", run_dir / "model")
    return final_metrics


# ---------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------


def rows_with_pairs(rows: list[tuple[dict, str]], source: str):
    """Convert raw rows into pairs, returning the usable (row, pair) items and drop counts.

    Rows of the wrong shape raise data.DataError, as they do when training.
    """
    usable = []
    dropped: Counter[str] = Counter()
    for row, where in rows:
        pair, reason = data.row_to_pair(row, where)
        if pair is None:
            dropped[reason] += 1
        else:
            usable.append((row, pair))
    if not usable:
        raise data.DataError(f"{source}: no usable pairs to score (dropped: {dict(dropped)})")
    return usable, dropped


def score_pairs(model, pairs: list[data.TokenizedPair], pad_token_id: int, batch_size: int,
                device: torch.device, description: str) -> tuple[list[float], list[float]]:
    """Score chosen and rejected responses of every pair without gradients, in input order.

    Pairs are batched longest first, which keeps padding low. The order
    depends only on the data, so a rerun forms the same batches.
    """
    lengths = [len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
               for pair in pairs]
    order = sorted(range(len(pairs)), key=lambda index: (-lengths[index], index))
    collator = data.PreferenceCollator(pad_token_id)
    chosen_rewards = [0.0] * len(pairs)
    rejected_rewards = [0.0] * len(pairs)

    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc=description,
                          mininterval=training.PROGRESS_INTERVAL, dynamic_ncols=True):
            indices = order[start:start + batch_size]
            batch = collator([pairs[index] for index in indices])
            batch = {key: value.to(device) for key, value in batch.items()}
            rewards = sequence_rewards(model, batch).cpu().tolist()
            for position, index in enumerate(indices):
                chosen_rewards[index] = rewards[position]
                rejected_rewards[index] = rewards[len(indices) + position]
    return chosen_rewards, rejected_rewards


def add_rewards(row: dict, chosen_reward: float, rejected_reward: float) -> dict:
    """Return a copy of the row with new reward columns; its old rewards move to original_*."""
    scored = dict(row)
    for column in ("chosen_reward", "rejected_reward"):
        if scored.get(column) is not None:
            scored[f"original_{column}"] = scored[column]
    scored["chosen_reward"] = chosen_reward
    scored["rejected_reward"] = rejected_reward
    return scored


def relabel_rows(rows: list[dict]) -> tuple[list[dict], int]:
    """Swap chosen and rejected in every row whose rejected_reward exceeds its chosen_reward.

    Each response's own columns (text, new and original rewards) move with it.
    Ties are left as labelled. Every row gets a boolean `relabelled` column.
    Returns the new rows and the number swapped.
    """
    relabelled_rows, swapped = [], 0
    for row in rows:
        row = dict(row)
        row["relabelled"] = row["rejected_reward"] > row["chosen_reward"]
        if row["relabelled"]:
            swapped += 1
            for chosen_column, rejected_column in RESPONSE_COLUMNS:
                if chosen_column in row or rejected_column in row:
                    row[chosen_column], row[rejected_column] = (row.get(rejected_column),
                                                                row.get(chosen_column))
        relabelled_rows.append(row)
    return relabelled_rows, swapped


def write_parquet(rows: list[dict], path: Path) -> None:
    """Write rows as one parquet table, with nulls where a row lacks a column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = pa.Table.from_pylist([{column: row.get(column) for column in columns}
                                  for row in rows])
    pq.write_table(table, path)


def write_scored_dataset(target: Path, tables: dict[str, list[dict]], summary: dict) -> None:
    """Write `<split>.parquet` files and the summary JSON, renamed into place once complete."""
    target = target.resolve()
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for split, rows in tables.items():
        write_parquet(rows, staging / f"{split}.parquet")
    (staging / SCORING_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    training.rename_into_place(staging, target)


def describe_source(dataset_config: DictConfig) -> str:
    if dataset_config.get("synthetic"):
        return f"synthetic set ({dataset_config.num_pairs} pairs, seed {dataset_config.seed})"
    return str(dataset_config.get("path") or dataset_config.get("name"))


def reward_difference_statistics(rows: list[dict]) -> dict[str, float]:
    differences = torch.tensor([row["chosen_reward"] - row["rejected_reward"] for row in rows],
                               dtype=torch.float64)
    return {"mean": float(differences.mean()),
            "std": float(differences.std()) if len(differences) > 1 else 0.0}


def score_dataset(config: DictConfig, run_dir: Path) -> Path:
    """Score every usable pair of the dataset, write the scored copy and return its directory."""
    started = time.perf_counter()
    reward_model_path = resolve_reward_model(config)
    check_reward_head(reward_model_path, config.model.trust_remote_code)
    output = Path(config.reward.output) if config.reward.output else run_dir / "scored"
    source = describe_source(config.dataset)
    for key in ("train_size_limit", "eval_size_limit"):
        if config.dataset.get(key) is not None:
            log.info("dataset.%s applies when training, not when scoring; scoring every row",
                     key)

    split_rows = data.read_source_rows(config.dataset)
    usable = {}
    dropped = {}
    for split, rows in split_rows.items():
        usable[split], dropped[split] = rows_with_pairs(rows, f"{source} ({split})")
        log.info("%s (%s): %d rows, %d usable pairs, dropped %s", source, split, len(rows),
                 len(usable[split]), dict(dropped[split]) or "none")

    if training.launched_process_count() > 1:
        raise RuntimeError(
            f"reward.job=score runs in one process, not {training.launched_process_count()}; "
            "start it with `python reward.py`, not `accelerate launch` or `torchrun`"
        )
    accelerator = training.make_accelerator(config.training)
    tokenizer = models.load_tokenizer(config.model.tokenizer or reward_model_path,
                                      config.model.trust_remote_code)
    tokenized = {
        split: data.tokenize_pairs([pair for _, pair in items], tokenizer,
                                   config.dataset.max_length, config.dataset.max_prompt_length)
        for split, items in usable.items()
    }
    model = load_reward_model(reward_model_path, tokenizer, config.model)
    model.to(accelerator.device)

    tables, split_summaries = {}, {}
    for split, items in usable.items():
        chosen_rewards, rejected_rewards = score_pairs(
            model, tokenized[split], tokenizer.pad_token_id, config.reward.batch_size,
            accelerator.device, description=f"score {split}",
        )
        rows = [add_rewards(row, chosen, rejected)
                for (row, _), chosen, rejected in zip(items, chosen_rewards, rejected_rewards,
                                                      strict=True)]
        agreement = sum(chosen > rejected for chosen, rejected
                        in zip(chosen_rewards, rejected_rewards, strict=True)) / len(rows)
        log.info("%s: the reward model scores the labelled chosen response higher in %.1f%% "
                 "of %d pairs", split, 100 * agreement, len(rows))
        split_summary = {"rows": len(rows), "dropped": dict(dropped[split]),
                         "label_agreement": agreement}
        if config.reward.relabel:
            rows, swapped = relabel_rows(rows)
            split_summary["relabelled"] = swapped
            log.info("%s: relabelled %d pairs, whose rejected response scored higher",
                     split, swapped)

        statistics = reward_difference_statistics(rows)
        split_summary["reward_difference"] = statistics
        log.info("%s: reward differences as written: mean %.4g, std %.4g", split,
                 statistics["mean"], statistics["std"])
        tables[split], split_summaries[split] = rows, split_summary

    summary = {
        "rows": sum(len(rows) for rows in tables.values()),
        "splits": split_summaries,
        "source": source,
        "reward_model": reward_model_path,
        "relabel": bool(config.reward.relabel),
        "max_length": config.dataset.max_length,
        "max_prompt_length": config.dataset.max_prompt_length,
    }
    write_scored_dataset(output, tables, summary)
    log.info("Wrote %d scored pairs to %s in %.0f s; train on them with dataset.path=%s",
             summary["rows"], output, time.perf_counter() - started, output)
    return output


def run_reward_job(config: DictConfig, run_dir: Path) -> dict[str, float] | Path:
    """Run `reward.job`: the final eval metrics of train, or the directory score wrote."""
    validate_reward_config(config)
    if config.reward.job == "train":
        return train_reward_model(config, run_dir)
    return score_dataset(config, run_dir)


@hydra.main(config_path="configs", config_name="reward", version_base="1.3")
def main(config: DictConfig) -> None:
    try:
        run_reward_job(config, training.shared_run_dir(Path(HydraConfig.get().runtime.output_dir)))
        training.close_process_group()
    except training.TrainingInterrupted as interrupted:
        log.warning("%s", interrupted)
        sys.exit(interrupted.exit_code)


if __name__ == "__main__":
    main()
