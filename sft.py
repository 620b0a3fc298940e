"""Supervised fine-tuning on the chosen responses of a preference set.

    uv run python sft.py                                   # tiny model, synthetic data
    uv run python sft.py model=pythia-2.8b dataset=hh_rlhf

Trains on the final assistant turn of each chosen dialogue with the prompt
masked, reports the held-out loss, and saves a Hugging Face checkpoint
(safetensors, tokenizer and the resolved config) to `<run dir>/model`, where
dpo.py finds it.
"""

import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

import data
import models
import training

log = logging.getLogger("sft")


def load_tokenizer_and_model(config: DictConfig, splits: data.PreferenceSplits):
    """Load the configured tokenizer and model, or build the tiny ones from the data."""
    model_config = config.model
    if model_config.tokenizer:
        tokenizer = models.load_tokenizer(model_config.tokenizer, model_config.trust_remote_code)
    else:
        log.info("Training a byte-level BPE tokenizer (vocab %d) on the training texts",
                 model_config.vocab_size)
        tokenizer = models.train_bpe_tokenizer(data.training_texts(splits.train),
                                               model_config.vocab_size)

    if model_config.name:
        log.info("Loading model %s", model_config.name)
        model = models.load_causal_lm(model_config.name, model_config.dtype,
                                      model_config.trust_remote_code)
    else:
        model = models.build_tiny_model(model_config.architecture, tokenizer,
                                        config.training.seed)
        model.to(models.torch_dtype(model_config.dtype))
    log.info("Model: %s, %.2fM parameters", type(model).__name__,
             sum(parameter.numel() for parameter in model.parameters()) / 1e6)
    model = models.configure_training(model, model_config.lora,
                                      config.training.gradient_checkpointing)
    return tokenizer, model


def sft_step(model, batch):
    """Mean negative log-likelihood per response token, with per-sequence statistics."""
    logps, token_counts = models.sequence_logps(model, batch)
    loss = -logps.sum() / token_counts.sum().clamp(min=1)
    return loss, {"nll": -logps.detach(), "tokens": token_counts.detach()}


def summarise_sft(statistics) -> dict[str, float]:
    loss = float(statistics["nll"].sum() / statistics["tokens"].sum().clamp(min=1))
    return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(loss)))}


def evaluate(accelerator, model, loader) -> dict[str, float]:
    """Token-level loss and perplexity of the chosen responses over the eval loader."""
    model.eval()
    statistics = training.evaluation_statistics(accelerator, loader,
                                                lambda batch: sft_step(model, batch))
    return summarise_sft(statistics)


def train_sft(config: DictConfig, run_dir: Path) -> dict[str, float]:
    """Run supervised fine-tuning and return the final eval metrics."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    training.validate_training_config(config.training)
    data.check_length_limits(config.dataset.max_length, config.dataset.max_prompt_length)
    models.validate_lora_config(config.model.lora)
    resume_from = training.find_resume_checkpoint(config.training.resume,
                                                  Path(config.outputs_dir), "sft")
    accelerator = training.make_accelerator(config.training)

    splits = data.load_preference_data(config.dataset, config.training.seed)
    tokenizer, model = load_tokenizer_and_model(config, splits)
    max_length, max_prompt_length = config.dataset.max_length, config.dataset.max_prompt_length
    train_set = data.tokenize_pairs(splits.train, tokenizer, max_length, max_prompt_length)
    eval_set = data.tokenize_pairs(splits.eval, tokenizer, max_length, max_prompt_length)

    collator = data.SFTCollator(tokenizer.pad_token_id)
    prepared = training.prepare_training(accelerator, model, train_set, eval_set, collator,
                                         config.training)
    model, optimizer, scheduler = prepared.model, prepared.optimizer, prepared.scheduler
    train_loader, eval_loader = prepared.train_loader, prepared.eval_loader
    total_steps = prepared.total_steps

    metrics = training.MetricsLogger(
        run_dir, training.init_wandb(config, run_dir, accelerator), accelerator.is_main_process
    )
    resolved_config = OmegaConf.to_yaml(config, resolve=True)

    def evaluate_and_log(step: int) -> dict[str, float]:
        eval_metrics = evaluate(accelerator, model, eval_loader)
        metrics.log("eval", step, eval_metrics)
        log.info("eval step %d: %s", step, training.format_metrics(eval_metrics))
        return eval_metrics

    def save_step_checkpoint(trainer_state: dict) -> Path:
        return training.save_step_checkpoint(
            accelerator, model, tokenizer, run_dir / "checkpoints",
            {"stage": "sft", **trainer_state}, {"sft_step_config.yaml": resolved_config},
            config.training.keep_checkpoints,
        )

    log.info("Training for %d steps of %d sequences", total_steps, config.training.batch_size)
    try:
        final_metrics = training.run_training(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            step_function=lambda batch: sft_step(model, batch),
            summarise=summarise_sft,
            evaluate=evaluate_and_log,
            metrics=metrics,
            training=config.training,
            total_steps=total_steps,
            save_step_checkpoint=save_step_checkpoint,
            resume_from=resume_from,
        )
        training.save_final_model(accelerator, model, tokenizer, run_dir,
                                  {"sft_config.yaml": resolved_config}, config.model.lora)
    finally:
        metrics.close()

    wall_time = time.perf_counter() - started
    log.info("Final eval: %s (%.0f s)", training.format_metrics(final_metrics), wall_time)
    log.info("SFT checkpoint: %s", run_dir / ("adapter" if config.model.lora.enabled
                                              and not config.model.lora.save_merged else "model"))
    return final_metrics


@hydra.main(config_path="configs", config_name="sft", version_base="1.3")
def main(config: DictConfig) -> None:
    try:
        train_sft(config, training.shared_run_dir(Path(HydraConfig.get().runtime.output_dir)))
        training.close_process_group()
    except training.TrainingInterrupted as interrupted:
        log.warning("%s", interrupted)
        sys.exit(interrupted.exit_code)


if __name__ == "__main__":
    main()
