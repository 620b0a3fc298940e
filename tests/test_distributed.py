"""Scaling out: global batch split, exact resume, LoRA, launcher configs and presets."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

import data
import dpo
import models
import training

REPOSITORY = Path(__file__).resolve().parent.parent
# Relative tolerance between one and two processes. Policy log-probs of the
# same pairs padded to different batch widths differ in float32 rounding
# (about 3e-6 at step 1). The cached reference log-probs do not share that
# rounding, so it does not cancel, and Adam amplifies it to about 3e-5 by step 3.
TOLERANCE = 2e-4


def compose_dpo(*overrides: str):
    with initialize_config_dir(config_dir=str(REPOSITORY / "configs"), version_base="1.3"):
        return compose("dpo", overrides=list(overrides))


@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX with a BPE tokenizer trained on synthetic pairs, saved like an SFT run."""
    pairs = data.build_synthetic_pairs(200, seed=0)
    tokenizer = models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=400)
    architecture = OmegaConf.create(
        {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 256}
    )
    model = models.build_tiny_model(architecture, tokenizer, seed=0)
    path = tmp_path_factory.mktemp("sft") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def dpo_overrides(checkpoint: Path, outputs_dir: Path, *extra: str) -> list[str]:
    return [
        f"model.name={checkpoint}",
        f"outputs_dir={outputs_dir}",
        "wandb.enabled=false",
        "dataset.num_pairs=200",
        "dataset.eval_size_limit=8",
        "training.batch_size=8",
        "training.warmup_steps=2",
        "training.eval_every=null",
        "training.learning_rate=1e-2",
        *extra,
    ]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == "train"]


# ---------------------------------------------------------------------------
# Global batch split
# ---------------------------------------------------------------------------


def test_sampler_steps_cover_same_pairs_for_any_split():
    single = training.GlobalBatchSampler(50, 8, num_processes=1, process_index=0,
                                         accumulation_steps=1, seed=3)
    for step in range(12):  # crosses the epoch boundary at step 6
        expected = single.step_micro_batches(step)[0]
        for num_processes, accumulation_steps in [(2, 1), (2, 2), (4, 2), (1, 8)]:
            indices = []
            for rank in range(num_processes):
                sampler = training.GlobalBatchSampler(50, 8, num_processes, rank,
                                                      accumulation_steps, seed=3)
                for micro_batch in sampler.step_micro_batches(step):
                    assert len(micro_batch) == 8 // (num_processes * accumulation_steps)
                    indices += micro_batch
            assert indices == expected


def test_sampler_reshuffles_each_epoch():
    sampler = training.GlobalBatchSampler(16, 8, 1, 0, 1, seed=0)
    first_epoch = sampler.step_micro_batches(0)[0] + sampler.step_micro_batches(1)[0]
    second_epoch = sampler.step_micro_batches(2)[0] + sampler.step_micro_batches(3)[0]
    assert sorted(first_epoch) == list(range(16))
    assert sorted(second_epoch) == list(range(16))
    assert first_epoch != second_epoch


def test_sampler_iteration_starts_at_start_step():
    sampler = training.GlobalBatchSampler(40, 8, 2, 1, 2, seed=0)
    sampler.start_step = 3
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(2)]
    assert first == sampler.step_micro_batches(3)


def test_accumulation_steps_from_global_batch():
    config = OmegaConf.create({"batch_size": 64, "micro_batch_size": 8, "learning_rate": 1.0,
                               "eval_every": None, "mixed_precision": None})
    assert training.validate_training_config(config, num_processes=1) == 8
    assert training.validate_training_config(config, num_processes=8) == 1
    config.micro_batch_size = None
    assert training.validate_training_config(config, num_processes=4) == 1


def test_indivisible_global_batch_rejected():
    config = OmegaConf.create({"batch_size": 12, "micro_batch_size": 4, "learning_rate": 1.0,
                               "eval_every": None, "mixed_precision": None})
    with pytest.raises(ValueError, match="multiple of 2 processes x training.micro_batch_size=4"):
        training.validate_training_config(config, num_processes=2)


def test_unknown_mixed_precision_rejected():
    config = OmegaConf.create({"batch_size": 8, "micro_batch_size": None, "learning_rate": 1.0,
                               "eval_every": None, "mixed_precision": "fp8"})
    with pytest.raises(ValueError, match="training.mixed_precision='fp8'"):
        training.validate_training_config(config, num_processes=1)


@pytest.mark.slow
def test_two_process_losses_match_one_process(sft_checkpoint, tmp_path):
    """Two gloo processes x 2 micro-batches of 2 pairs equal one process x 2 of 4 pairs."""
    overrides = dpo_overrides(sft_checkpoint, tmp_path, "training.max_steps=3")
    two_process_dir = tmp_path / "two"
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "TQDM_DISABLE": "1",
                   "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29517", "dpo.py", *overrides, "training.micro_batch_size=2",
         f"hydra.run.dir={two_process_dir}"],
        cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    one_process_dir = tmp_path / "one"
    one_process_dir.mkdir()
    dpo.train_dpo(compose_dpo(*overrides, "training.micro_batch_size=4"), one_process_dir)

    two_process = train_records(two_process_dir)
    one_process = train_records(one_process_dir)
    assert [record["step"] for record in two_process] == [1, 2, 3]
    for parallel, single in zip(two_process, one_process, strict=True):
        assert parallel["loss"] == pytest.approx(single["loss"], rel=TOLERANCE, abs=TOLERANCE)
        assert parallel["rewards/margins"] == pytest.approx(single["rewards/margins"],
                                                            rel=TOLERANCE, abs=TOLERANCE)
        assert parallel["grad_norm"] == pytest.approx(single["grad_norm"], rel=TOLERANCE)
        assert parallel["learning_rate"] == single["learning_rate"]


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------


def send_sigterm_after_step(metrics_path: Path, step: int, stop: threading.Event) -> None:
    """Signal this process once `metrics_path` records training step `step`."""
    marker = f'"split": "train", "step": {step},'
    while not stop.is_set():
        if metrics_path.exists() and marker in metrics_path.read_text():
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_then_resume_matches_uninterrupted(sft_checkpoint, tmp_path):
    overrides = dpo_overrides(sft_checkpoint, tmp_path / "outputs", "training.max_steps=8",
                              "training.micro_batch_size=4")
    uninterrupted_dir = tmp_path / "uninterrupted"
    uninterrupted_dir.mkdir()
    expected = dpo.train_dpo(compose_dpo(*overrides), uninterrupted_dir)

    interrupted_dir = tmp_path / "outputs" / "dpo" / "interrupted"
    interrupted_dir.mkdir(parents=True)
    stop = threading.Event()
    watcher = threading.Thread(target=send_sigterm_after_step,
                               args=(interrupted_dir / "metrics.jsonl", 2, stop))
    watcher.start()
    try:
        with pytest.raises(training.TrainingInterrupted) as interrupted:
            dpo.train_dpo(compose_dpo(*overrides), interrupted_dir)
    finally:
        stop.set()
        watcher.join()
    assert interrupted.value.signal_number == signal.SIGTERM
    assert interrupted.value.exit_code == 143
    assert 2 <= interrupted.value.step < 8
    assert training.is_resumable_checkpoint(interrupted.value.checkpoint)

    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed = dpo.train_dpo(compose_dpo(*overrides, "training.resume=true"), resumed_dir)

    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert resumed[key] == pytest.approx(expected[key], abs=TOLERANCE)
    uninterrupted_losses = {record["step"]: record["loss"]
                            for record in train_records(uninterrupted_dir)}
    resumed_records = train_records(resumed_dir)
    assert resumed_records[0]["step"] == interrupted.value.step + 1
    for record in resumed_records:
        assert record["loss"] == pytest.approx(uninterrupted_losses[record["step"]], abs=TOLERANCE)


def test_resume_true_without_checkpoint_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="found no dpo checkpoint under"):
        training.find_resume_checkpoint(True, tmp_path, "dpo")


def test_resume_path_without_checkpoint_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a step checkpoint"):
        training.find_resume_checkpoint(str(tmp_path), tmp_path, "dpo")


def test_resume_with_other_batch_size_rejected(tmp_path):
    with pytest.raises(ValueError, match="saved with batch_size=16, but this run has batch_size=8"):
        training.check_resume_compatible({"batch_size": 16, "seed": 0},
                                         {"batch_size": 8, "seed": 0}, tmp_path)


@pytest.mark.slow
def test_resume_with_other_loss_rejected(sft_checkpoint, tmp_path):
    first = tmp_path / "first"
    dpo.train_dpo(compose_dpo(*dpo_overrides(sft_checkpoint, tmp_path, "training.max_steps=2",
                                             "training.save_every=1", "dpo.loss_type=sigmoid")),
                  first)
    checkpoint = first / "checkpoints" / "step-000002"
    resumed = compose_dpo(*dpo_overrides(sft_checkpoint, tmp_path, "training.max_steps=2",
                                         "dpo.loss_type=ipo", f"training.resume={checkpoint}"))
    with pytest.raises(ValueError, match="saved with loss_type='sigmoid', but this run has "
                                         "loss_type='ipo'"):
        dpo.train_dpo(resumed, tmp_path / "second")


# ---------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------


def lora_config(**changes):
    settings = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0,
                "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                "save_merged": False}
    return OmegaConf.create({**settings, **changes})


def batch_of_pairs(checkpoint: Path) -> dict[str, torch.Tensor]:
    tokenizer = models.load_tokenizer(str(checkpoint), trust_remote_code=False)
    pairs = data.tokenize_pairs(data.build_synthetic_pairs(4, seed=1), tokenizer, 64, 32)
    return data.PreferenceCollator(tokenizer.pad_token_id)(pairs)


def test_adapter_disabled_reference_scores_like_base(sft_checkpoint):
    base = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    batch = batch_of_pairs(sft_checkpoint)
    base_logps, _ = models.sequence_logps(base, batch)

    policy = models.add_lora_adapters(AutoModelForCausalLM.from_pretrained(sft_checkpoint),
                                      lora_config())
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.05)
    reference = models.AdapterDisabledReference(policy, policy)
    reference_logps, _ = models.sequence_logps(reference, batch)
    policy_logps, _ = models.sequence_logps(policy, batch)

    assert torch.allclose(reference_logps, base_logps, atol=1e-5)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)


@pytest.mark.slow
def test_lora_dpo_trains_one_base_copy_adapter_loads(sft_checkpoint, tmp_path, monkeypatch):
    from peft import PeftModel

    loaded = []
    load_causal_lm = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm",
                        lambda *arguments: loaded.append(arguments) or load_causal_lm(*arguments))
    overrides = dpo_overrides(
        sft_checkpoint, tmp_path, "training.max_steps=3", "model.lora.enabled=true",
        "model.lora.rank=4", "model.lora.save_merged=true",
    )
    metrics = dpo.train_dpo(compose_dpo(*overrides), tmp_path)

    assert len(loaded) == 1
    assert metrics["rewards/margins"] != 0.0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    base = AutoModelForCausalLM.from_pretrained(sft_checkpoint)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    batch = batch_of_pairs(sft_checkpoint)
    adapted_logps, _ = models.sequence_logps(adapted, batch)
    merged_logps, _ = models.sequence_logps(merged, batch)
    with adapted.disable_adapter():
        base_logps, _ = models.sequence_logps(adapted, batch)
    assert torch.allclose(adapted_logps, merged_logps, atol=1e-4)
    assert not torch.allclose(adapted_logps, base_logps, atol=1e-3)


def test_lora_without_target_modules_rejected():
    with pytest.raises(ValueError, match="model.lora.target_modules is empty"):
        models.validate_lora_config(lora_config(target_modules=[]))


# ---------------------------------------------------------------------------
# Launcher configs and presets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, distributed_type", [
    ("ddp", "MULTI_GPU"),
    ("fsdp", "FSDP"),
    ("deepspeed_zero2", "DEEPSPEED"),
    ("deepspeed_zero3", "DEEPSPEED"),
])
def test_accelerate_config_loads(name, distributed_type):
    config = load_config_from_file(str(REPOSITORY / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == distributed_type
    assert config.compute_environment.value == "LOCAL_MACHINE"


def test_fsdp_config_wraps_gpt_neox_blocks():
    config = load_config_from_file(str(REPOSITORY / "configs" / "accelerate" / "fsdp.yaml"))
    assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "GPTNeoXLayer"
    assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"


def test_deepspeed_configs_set_zero_stage():
    for stage in (2, 3):
        path = REPOSITORY / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml"
        assert load_config_from_file(str(path)).deepspeed_config["zero_stage"] == stage


def test_paper_preset_composes():
    config = compose_dpo("experiment=paper")
    assert config.dataset.name == "Anthropic/hh-rlhf"
    assert config.model.label == "pythia-2.8b"
    assert config.dpo.loss_type == "sigmoid"
    assert config.dpo.beta == 0.1
    assert config.training.batch_size == 64
    assert config.training.learning_rate == 1e-6
    assert config.training.mixed_precision == "bf16"
