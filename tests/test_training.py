"""Loop machinery: atomic checkpoints, the non-finite-loss guard, config checks."""

import os

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

import data
import models
import training

ARCHITECTURE = OmegaConf.create(
    {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_position_embeddings": 128}
)


@pytest.fixture(scope="module")
def tiny_parts():
    pairs = data.build_synthetic_pairs(64, seed=0)
    tokenizer = models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=300)
    model = models.build_tiny_model(ARCHITECTURE, tokenizer, seed=0)
    tokenized = data.tokenize_pairs(pairs, tokenizer, max_length=64, max_prompt_length=32)
    return tokenizer, model, tokenized


def training_config(**overrides):
    config = compose_config("sft", ["wandb.enabled=false"]).training
    return OmegaConf.merge(config, overrides)


def test_checkpoint_saves_loadable_model(tmp_path, tiny_parts):
    tokenizer, model, _ = tiny_parts
    accelerator = training.make_accelerator(training_config())
    training.save_checkpoint(accelerator, model, tokenizer, tmp_path / "model",
                             {"note.yaml": "a: 1\n"})
    loaded = models.load_causal_lm(str(tmp_path / "model"), "float32", False)
    assert models.is_checkpoint_dir(tmp_path / "model")
    assert (tmp_path / "model" / "note.yaml").read_text() == "a: 1\n"
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, loaded.state_dict()[name]), name


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, tiny_parts):
    tokenizer, model, _ = tiny_parts
    accelerator = training.make_accelerator(training_config())
    target = tmp_path / "model"
    training.save_checkpoint(accelerator, model, tokenizer, target, {"marker": "first"})
    before = {path.name: path.read_bytes() for path in target.iterdir()}

    class BrokenTokenizer:
        def save_pretrained(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        training.save_checkpoint(accelerator, model, BrokenTokenizer(), target,
                                 {"marker": "second"})
    after = {path.name: path.read_bytes() for path in target.iterdir()}
    assert after == before


def test_overwriting_checkpoint_replaces_it_whole(tmp_path, tiny_parts):
    tokenizer, model, _ = tiny_parts
    accelerator = training.make_accelerator(training_config())
    target = tmp_path / "model"
    training.save_checkpoint(accelerator, model, tokenizer, target, {"marker": "first"})
    training.save_checkpoint(accelerator, model, tokenizer, target, {"marker": "second"})
    assert (target / "marker").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_prune_keeps_newest_checkpoints(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / f"step-{step:06d}").mkdir()
    training.prune_checkpoints(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-000020", "step-000030"]


def test_non_finite_loss_stops_before_update(tmp_path, tiny_parts):
    tokenizer, model, tokenized = tiny_parts
    config = training_config(batch_size=8, eval_every=None, save_every=1, warmup_steps=0)
    accelerator = training.make_accelerator(config)
    loader = training.build_train_loader(tokenized, data.SFTCollator(tokenizer.pad_token_id),
                                         config, accelerator)
    optimizer = training.build_optimizer(model, config)
    scheduler = training.build_scheduler(optimizer, config, total_steps=5)
    saved_steps = []

    def step_function(batch):
        logps, counts = models.sequence_logps(model, batch)
        loss = -logps.sum() / counts.sum()
        if len(saved_steps) == 2:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach().expand(len(logps))}

    def save_step_checkpoint(trainer_state):
        training.save_checkpoint(accelerator, model, tokenizer, tmp_path / "last", {})
        saved_steps.append(trainer_state["step"])
        return tmp_path / "last"

    with pytest.raises(training.NonFiniteLossError, match="nan at step 3"):
        training.run_training(
            accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
            train_loader=loader, step_function=step_function,
            summarise=lambda statistics: {"loss": float(statistics["loss"].mean())},
            evaluate=lambda step: {}, metrics=training.MetricsLogger(tmp_path, enabled=False),
            training=config, total_steps=5,
            save_step_checkpoint=save_step_checkpoint,
        )
    saved = models.load_causal_lm(str(tmp_path / "last"), "float32", False)
    assert saved_steps == [1, 2]
    for name, parameter in model.state_dict().items():
        assert torch.isfinite(parameter).all(), name
        assert torch.equal(parameter, saved.state_dict()[name]), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 30, "micro_batch_size": 8}, "must be a multiple of"),
        ({"batch_size": 0}, "must be positive"),
        ({"learning_rate": 0.0}, "learning_rate=0.0 must be positive"),
        ({"eval_every": 0}, "eval_every=0 must be a positive number of steps"),
    ],
)
def test_invalid_training_settings_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        training.validate_training_config(training_config(**overrides))


def test_accumulation_steps_from_micro_batch():
    assert training.validate_training_config(training_config(batch_size=32,
                                                             micro_batch_size=8)) == 4


def test_too_few_pairs_for_one_batch_is_rejected():
    with pytest.raises(ValueError, match="do not fill one batch"):
        training.count_steps(10, training_config(batch_size=32))


def test_newest_sft_checkpoint_picks_latest(tmp_path, tiny_parts):
    tokenizer, model, _ = tiny_parts
    accelerator = training.make_accelerator(training_config())
    assert models.newest_sft_checkpoint(tmp_path) is None
    for name in ("older", "newer"):
        training.save_checkpoint(accelerator, model, tokenizer, tmp_path / "sft" / name / "model",
                                 {"sft_config.yaml": "model: {label: tiny}\n"})
    older = tmp_path / "sft" / "older" / "model" / "sft_config.yaml"
    os.utime(older, (1, 1))
    assert models.newest_sft_checkpoint(tmp_path) == tmp_path / "sft" / "newer" / "model"


def test_wandb_credentials_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not training.wandb_credentials_found()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert training.wandb_credentials_found()


def test_wandb_logs_offline_without_credentials(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level("INFO", logger="training")
    config = compose_config("dpo", [])
    accelerator = training.make_accelerator(config.training)

    run = training.init_wandb(config, tmp_path, accelerator)
    metrics = training.MetricsLogger(tmp_path, run)
    metrics.log("eval", 0, {"rewards/margins": 0.0})
    metrics.close()

    notices = [record for record in caplog.records if "No W&B credentials" in record.message]
    assert len(notices) == 1
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_newest_sft_checkpoint_matches_labels(tmp_path, tiny_parts):
    tokenizer, model, _ = tiny_parts
    accelerator = training.make_accelerator(training_config())
    runs = {"hh": "hh_rlhf", "synthetic": "synthetic"}
    for name, dataset_label in runs.items():
        training.save_checkpoint(
            accelerator, model, tokenizer, tmp_path / "sft" / name / "model",
            {"sft_config.yaml": f"model: {{label: tiny}}\ndataset: {{label: {dataset_label}}}\n"},
        )
    os.utime(tmp_path / "sft" / "synthetic" / "model" / "sft_config.yaml", (1, 1))

    found = models.newest_sft_checkpoint(tmp_path, "tiny", "synthetic")
    assert found == tmp_path / "sft" / "synthetic" / "model"
    with pytest.raises(FileNotFoundError, match="model=pythia-160m and dataset=synthetic"):
        models.newest_sft_checkpoint(tmp_path, "pythia-160m", "synthetic")


@pytest.mark.slow
def test_wandb_falls_back_offline_when_server_unreachable(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # closed port on this machine
    monkeypatch.delenv("WANDB_MODE", raising=False)
    caplog.set_level("INFO", logger="training")
    config = compose_config("dpo", [])
    accelerator = training.make_accelerator(config.training)

    run = training.init_wandb(config, tmp_path, accelerator)
    run.finish()

    assert "W&B online logging failed" in caplog.text
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
