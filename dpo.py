"""Preference training against a frozen reference with one of the losses in losses.py.

    uv run python dpo.py                                   # REBEL, beta 5, newest SFT run
    uv run python dpo.py dpo.loss_type=sigmoid dpo.beta=0.1
    uv run python dpo.py -m dpo.loss_type=sigmoid,hinge,ipo,rebel dpo.beta=0.1,5.0

Policy and reference both start from the SFT checkpoint (`model.name`, or the
newest SFT run under `outputs_dir`). The run evaluates before the first
update, every `training.eval_every` steps and at the end, writes each eval's
per-example implicit margins to `eval_margins.jsonl`, and saves the final
policy to `<run dir>/model` (a LoRA policy: its adapter to `<run dir>/adapter`).
docs/scaling.md covers multi-GPU launches, LoRA and resuming.
"""

import functools
import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from accelerate import PartialState
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import data
import losses
import models
import reference_cache
import training

log = logging.getLogger("dpo")


def validate_dpo_config(config: DictConfig) -> losses.LossSpec:
    """Check the loss settings before any data or model loads; return the loss spec."""
    spec = losses.get_loss(config.dpo.loss_type)
    if not isinstance(config.dpo.beta, int | float) or isinstance(config.dpo.beta, bool):
        raise ValueError(f"dpo.beta={config.dpo.beta!r} is not a number; use e.g. dpo.beta=5.0")
    if not config.dpo.beta > 0:
        raise ValueError(f"dpo.beta={config.dpo.beta} must be positive, e.g. dpo.beta=5.0")
    smoothing = config.dpo.label_smoothing
    if smoothing and "label_smoothing" not in spec.options:
        raise ValueError(
            f"dpo.label_smoothing={smoothing} applies only to dpo.loss_type=sigmoid, "
            f"not {config.dpo.loss_type}; set dpo.label_smoothing=0"
        )
    if not 0.0 <= smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing={smoothing} must be in [0, 0.5)")
    data.check_length_limits(config.dataset.max_length, config.dataset.max_prompt_length)
    return spec


def resolve_checkpoint(config: DictConfig) -> str:
    """Return the checkpoint that policy and reference start from."""
    if config.model.name:
        return config.model.name
    outputs_dir = Path(config.outputs_dir)
    checkpoint = models.newest_sft_checkpoint(outputs_dir, config.model.label,
                                              config.dataset.label)
    if checkpoint is None:
        raise FileNotFoundError(
            f"No SFT checkpoint found under {outputs_dir.resolve()}. Run `python sft.py` "
            "first (with the same model and dataset overrides), or set model.name to a "
            "checkpoint path or hub id."
        )
    log.info("Starting from the newest SFT checkpoint: %s", checkpoint)
    return str(checkpoint)


def require_rewards(spec: losses.LossSpec, config: DictConfig,
                    splits: data.PreferenceSplits) -> None:
    """Fail before any model loads when the loss needs rewards the data lacks."""
    if spec.uses_rewards and not splits.has_rewards:
        valid = ", ".join(name for name, other in losses.LOSSES.items() if not other.uses_rewards)
        raise data.DataError(
            f"dpo.loss_type={config.dpo.loss_type} needs reward columns 'chosen_reward' and "
            f"'rejected_reward', which dataset {config.dataset.label!r} lacks. Use a loss "
            f"that needs only preferences ({valid}), or a dataset with rewards "
            "(dataset=synthetic, or files that carry both columns)."
        )


def load_policy(checkpoint: str, config: DictConfig):
    """Load the tokenizer and the trainable policy from the checkpoint.

    With LoRA (`model.lora.enabled`) the policy carries adapters, and the
    reference is the same network with its adapters disabled.
    """
    model_config = config.model
    tokenizer = models.load_tokenizer(model_config.tokenizer or checkpoint,
                                      model_config.trust_remote_code)
    policy = models.load_causal_lm(checkpoint, model_config.dtype, model_config.trust_remote_code)
    models.disable_dropout(policy)
    policy = models.configure_training(policy, model_config.lora,
                                       config.training.gradient_checkpointing)
    return tokenizer, policy


def load_reference(checkpoint: str, config: DictConfig):
    """Load the checkpoint again as the frozen reference."""
    model_config = config.model
    reference = models.load_causal_lm(checkpoint, model_config.dtype,
                                      model_config.trust_remote_code)
    models.disable_dropout(reference)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def attach_cached_reference_logps(checkpoint: str, config: DictConfig, accelerator, tokenizer,
                                  policy, train_set, eval_set):
    """Load or compute the reference log-probs of every pair and attach them to the pairs.

    With LoRA the reference pass runs the policy with its adapters disabled,
    so no second copy of the base weights is loaded even for that pass.
    """
    pairs = {"train": train_set, "eval": eval_set}
    key = reference_cache.cache_key(checkpoint, train_set, eval_set, config.model.dtype,
                                    config.training.mixed_precision)
    logps = reference_cache.cached_reference_logps(
        cache_dir=Path(config.dpo.reference_cache_dir),
        key=key,
        pairs=pairs,
        load_reference=(
            functools.partial(models.AdapterDisabledReference, policy, policy)
            if config.model.lora.enabled
            else functools.partial(load_reference, checkpoint, config)
        ),
        pad_token_id=tokenizer.pad_token_id,
        batch_size=config.training.eval_batch_size,
        accelerator=accelerator,
    )
    return (reference_cache.attach_reference_logps(train_set, logps["train"]),
            reference_cache.attach_reference_logps(eval_set, logps["eval"]))


def preference_step(policy, reference, loss_function, spec: losses.LossSpec, batch):
    """Score chosen and rejected in one policy forward pass and compute the loss.

    The reference log-probs come from `batch["reference_logps"]` when the batch
    carries them (precomputed), otherwise from a no-grad pass of `reference`.
    Returns the mean loss and per-pair statistics: the loss, implicit rewards,
    summed log-probs, and reward differences when the batch has them.
    """
    if "reference_logps" in batch:
        reference_logps = batch["reference_logps"]
    else:
        # The reference goes first, so its activations are freed before the policy's are kept.
        with torch.no_grad():
            reference_logps, _ = models.sequence_logps(reference, batch)
    policy_logps, token_counts = models.sequence_logps(policy, batch)

    summed_policy_logps = policy_logps
    if spec.average_logps:
        policy_logps = policy_logps / token_counts.clamp(min=1)
        reference_logps = reference_logps / token_counts.clamp(min=1)

    pairs = len(policy_logps) // 2
    reward_arguments = {}
    if spec.uses_rewards:
        reward_arguments["reward_differences"] = batch["reward_differences"]
    output = loss_function(
        policy_logps[:pairs],
        policy_logps[pairs:],
        reference_logps[:pairs],
        reference_logps[pairs:],
        **reward_arguments,
    )

    statistics = {
        "loss": output.losses.detach(),
        "rewards/chosen": output.chosen_rewards,
        "rewards/rejected": output.rejected_rewards,
        "logps/chosen": summed_policy_logps[:pairs].detach(),
        "logps/rejected": summed_policy_logps[pairs:].detach(),
    }
    if "reward_differences" in batch:
        statistics["reward_differences"] = batch["reward_differences"]
    return output.losses.mean(), statistics


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Pearson correlation of two 1-D tensors, or None when either is constant."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    if denominator == 0:
        return None
    return float((x * y).sum() / denominator)


def summarise_preferences(statistics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average the per-pair statistics into the field's metric names."""
    margins = statistics["rewards/chosen"] - statistics["rewards/rejected"]
    summary = {
        "loss": float(statistics["loss"].mean()),
        "rewards/chosen": float(statistics["rewards/chosen"].mean()),
        "rewards/rejected": float(statistics["rewards/rejected"].mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/margins_std": float(margins.std()) if len(margins) > 1 else 0.0,
        "rewards/accuracies": float((margins > 0).float().mean()),
        "logps/chosen": float(statistics["logps/chosen"].mean()),
        "logps/rejected": float(statistics["logps/rejected"].mean()),
    }
    if "reward_differences" in statistics:
        correlation = pearson_correlation(margins, statistics["reward_differences"])
        if correlation is not None:
            summary["rewards/margin_correlation"] = correlation
    return summary




def write_eval_margins(path: Path, step: int, statistics: dict[str, torch.Tensor]) -> None:
    """Append one line per eval pair: step, index, implicit margin and reward difference."""
    margins = (statistics["rewards/chosen"] - statistics["rewards/rejected"]).tolist()
    differences = statistics.get("reward_differences")
    differences = differences.tolist() if differences is not None else [None] * len(margins)
    with path.open("a", encoding="utf-8") as lines:
        for index, (margin, difference) in enumerate(zip(margins, differences, strict=True)):
            record = {"step": step, "index": index, "margin": margin}
            if difference is not None:
                record["reward_difference"] = difference
            lines.write(json.dumps(record) + "\n")


def log_reward_statistics(splits: data.PreferenceSplits) -> None:
    if not splits.has_rewards:
        return
    differences = torch.tensor([pair.chosen_reward - pair.rejected_reward for pair in splits.train])
    log.info("Reward differences of the training pairs: mean %.4g, std %.4g",
             float(differences.mean()), float(differences.std()))


def train_dpo(config: DictConfig, run_dir: Path) -> dict[str, float]:
    """Run preference training and return the final eval metrics."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = validate_dpo_config(config)
    training.validate_training_config(config.training)
    models.validate_lora_config(config.model.lora)
    resume_from = training.find_resume_checkpoint(config.training.resume,
                                                  Path(config.outputs_dir), "dpo")
    checkpoint = resolve_checkpoint(config)

    splits = data.load_preference_data(config.dataset, config.training.seed)
    require_rewards(spec, config, splits)
    log_reward_statistics(splits)

    accelerator = training.make_accelerator(config.training)
    tokenizer, policy = load_policy(checkpoint, config)
    max_length, max_prompt_length = config.dataset.max_length, config.dataset.max_prompt_length
    cache_dir = Path(config.cache_dir) if config.get("cache_dir") else None
    train_set = data.tokenize_pairs_cached(splits.train, tokenizer, max_length,
                                           max_prompt_length, cache_dir)
    eval_set = data.tokenize_pairs_cached(splits.eval, tokenizer, max_length,
                                          max_prompt_length, cache_dir)

    collator = data.PreferenceCollator(tokenizer.pad_token_id)
    reference = None
    if config.dpo.precompute_ref_logps:
        train_set, eval_set = attach_cached_reference_logps(checkpoint, config, accelerator,
                                                            tokenizer, policy, train_set, eval_set)
        collator = reference_cache.ReferenceLogpsCollator(collator)
    elif not config.model.lora.enabled:
        reference = load_reference(checkpoint, config)

    prepared = training.prepare_training(accelerator, policy, train_set, eval_set, collator,
                                         config.training)
    policy, optimizer, scheduler = prepared.model, prepared.optimizer, prepared.scheduler
    train_loader, eval_loader = prepared.train_loader, prepared.eval_loader
    total_steps = prepared.total_steps
    if reference is not None:
        reference = training.prepare_reference(accelerator, reference)
    elif config.model.lora.enabled and not config.dpo.precompute_ref_logps:
        reference = models.AdapterDisabledReference(policy, accelerator.unwrap_model(policy))

    loss_options = {name: config.dpo[name] for name in spec.options}
    loss_function = functools.partial(spec.function, beta=config.dpo.beta, **loss_options)
    step_function = functools.partial(preference_step, policy, reference, loss_function, spec)

    metrics = training.MetricsLogger(
        run_dir, training.init_wandb(config, run_dir, accelerator), accelerator.is_main_process
    )
    margins_path = run_dir / "eval_margins.jsonl"

    def evaluate_and_log(step: int) -> dict[str, float]:
        policy.eval()
        started_eval = time.perf_counter()
        statistics = training.evaluation_statistics(accelerator, eval_loader, step_function)
        elapsed = time.perf_counter() - started_eval
        eval_metrics = summarise_preferences(statistics)
        eval_metrics["pairs_per_second"] = len(statistics["loss"]) / elapsed
        if accelerator.is_main_process:
            write_eval_margins(margins_path, step, statistics)
        metrics.log("eval", step, eval_metrics)
        log.info("eval step %d: %s", step, training.format_metrics(eval_metrics))
        return eval_metrics

    resolved_config = OmegaConf.to_yaml(config, resolve=True)

    def save_step_checkpoint(trainer_state: dict) -> Path:
        return training.save_step_checkpoint(
            accelerator, policy, tokenizer, run_dir / "checkpoints",
            {"stage": "dpo", **trainer_state}, {"dpo_config.yaml": resolved_config},
            config.training.keep_checkpoints,
        )

    log.info("Training %s (beta %g) for %d steps of %d pairs", config.dpo.loss_type,
             config.dpo.beta, total_steps, config.training.batch_size)
    try:
        final_metrics = training.run_training(
            accelerator=accelerator,
            model=policy,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            step_function=step_function,
            summarise=summarise_preferences,
            evaluate=evaluate_and_log,
            metrics=metrics,
            training=config.training,
            total_steps=total_steps,
            save_step_checkpoint=save_step_checkpoint,
            evaluate_first=True,
            resume_from=resume_from,
            run_identity={"loss_type": config.dpo.loss_type, "beta": config.dpo.beta,
                          "learning_rate": config.training.learning_rate},
        )
        training.save_final_model(accelerator, policy, tokenizer, run_dir,
                                  {"dpo_config.yaml": resolved_config}, config.model.lora)
    finally:
        metrics.close()

    wall_time = time.perf_counter() - started
    if accelerator.is_main_process:
        summary = {"status": "completed", "loss_type": config.dpo.loss_type,
                   "beta": config.dpo.beta, "wall_time_seconds": wall_time, **final_metrics}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("Final eval: %s (%.0f s)", training.format_metrics(final_metrics), wall_time)
    return final_metrics


def write_failure_summary(run_dir: Path, config: DictConfig, error: Exception,
                          wall_time: float) -> None:
    """Write `summary.json` with status "failed" and the error, so sweep reports list the run."""
    summary = {"status": "failed", "loss_type": config.dpo.get("loss_type"),
               "beta": config.dpo.get("beta"), "wall_time_seconds": wall_time,
               "error": f"{type(error).__name__}: {error}"}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


@hydra.main(config_path="configs", config_name="dpo", version_base="1.3")
def main(config: DictConfig) -> None:
    run_dir = training.shared_run_dir(Path(HydraConfig.get().runtime.output_dir))
    started = time.perf_counter()
    try:
        train_dpo(config, run_dir)
        training.close_process_group()
    except training.TrainingInterrupted as interrupted:
        log.warning("%s", interrupted)
        sys.exit(interrupted.exit_code)
    except Exception as error:
        if PartialState().is_main_process:
            write_failure_summary(run_dir, config, error, time.perf_counter() - started)
        raise


if __name__ == "__main__":
    main()
