"""SFT then preference training on a tiny model, in-process and through the CLI."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import CONFIG_DIR, REPO_ROOT, compose_config

import data
import dpo
import sft

TINY_MODEL = [
    "model.architecture.hidden_size=32",
    "model.architecture.num_layers=1",
    "model.architecture.num_heads=2",
    "model.vocab_size=400",
]
HH_DATA = [
    "dataset=hh_rlhf",
    "dataset.train_size_limit=96",
    "dataset.eval_size_limit=32",
    "dataset.max_length=96",
    "dataset.max_prompt_length=64",
]
SMALL_SYNTHETIC = ["dataset.num_pairs=400", "dataset.eval_fraction=0.1"]
QUICK_TRAINING = [
    "wandb.enabled=false",
    "training.batch_size=16",
    "training.eval_batch_size=32",
    "training.max_steps=4",
    "training.eval_every=2",
    "training.warmup_steps=1",
]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hh_sft_run(tmp_path_factory, hh_file):
    outputs = tmp_path_factory.mktemp("outputs")
    run_dir = outputs / "sft" / "hh"
    run_dir.mkdir(parents=True)
    config = compose_config("sft", [*TINY_MODEL, *HH_DATA, *QUICK_TRAINING,
                                    f"dataset.path={hh_file.parent}", f"outputs_dir={outputs}"])
    metrics = sft.train_sft(config, run_dir)
    return outputs, run_dir, metrics


@pytest.mark.slow
def test_sft_saves_checkpoint_with_tokenizer_and_config(hh_sft_run):
    _, run_dir, metrics = hh_sft_run
    model_dir = run_dir / "model"
    saved_config = yaml.safe_load((model_dir / "sft_config.yaml").read_text())
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    assert saved_config["dataset"]["label"] == "hh_rlhf"
    assert metrics["loss"] > 0
    assert [record["split"] for record in read_jsonl(run_dir / "metrics.jsonl")].count("eval") == 2


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_preference_training_on_real_hh_rows(hh_sft_run, hh_file, tmp_path, loss_type):
    outputs, _, _ = hh_sft_run
    config = compose_config("dpo", [*HH_DATA, *QUICK_TRAINING, f"dataset.path={hh_file.parent}",
                                    f"outputs_dir={outputs}", f"dpo.loss_type={loss_type}",
                                    "dpo.beta=0.1"])
    final = dpo.train_dpo(config, tmp_path)

    records = read_jsonl(tmp_path / "metrics.jsonl")
    first_eval = next(record for record in records if record["split"] == "eval")
    margins = read_jsonl(tmp_path / "eval_margins.jsonl")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert first_eval["step"] == 0
    assert first_eval["rewards/margins"] == 0.0
    assert first_eval["rewards/chosen"] == 0.0
    assert [record["step"] for record in records if record["split"] == "train"] == [1, 2, 3, 4]
    assert {record["step"] for record in margins} == {0, 2, 4}
    assert len(margins) == 3 * 32
    assert summary["loss_type"] == loss_type
    assert summary["rewards/accuracies"] == final["rewards/accuracies"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "logps/rejected", "pairs_per_second"):
        assert key in final, key
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_rebel_on_hh_rows_fails_naming_reward_columns(hh_sft_run, hh_file, tmp_path,
                                                      monkeypatch):
    outputs, _, _ = hh_sft_run

    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the reward check")

    monkeypatch.setattr(dpo.models, "load_causal_lm", no_model_loads)
    config = compose_config("dpo", [*HH_DATA, *QUICK_TRAINING, f"dataset.path={hh_file.parent}",
                                    f"outputs_dir={outputs}", "dpo.loss_type=rebel"])
    with pytest.raises(data.DataError) as error:
        dpo.train_dpo(config, tmp_path)
    message = str(error.value)
    assert "'chosen_reward'" in message
    assert "'rejected_reward'" in message
    assert "sigmoid" in message
    assert "dataset=synthetic" in message


@pytest.mark.slow
def test_rebel_on_synthetic_reports_reward_correlation(tmp_path):
    outputs = tmp_path / "outputs"
    sft_dir = outputs / "sft" / "synthetic"
    sft_dir.mkdir(parents=True)
    overrides = [*SMALL_SYNTHETIC, *QUICK_TRAINING, f"outputs_dir={outputs}"]
    sft.train_sft(compose_config("sft", [*TINY_MODEL, *overrides]), sft_dir)

    dpo_dir = tmp_path / "dpo"
    dpo_dir.mkdir()
    # Length grouping on top of the cached reference log-probs, as the benchmark runs it.
    final = dpo.train_dpo(compose_config("dpo", [*overrides, "training.group_by_length=true"]),
                          dpo_dir)
    margins = read_jsonl(dpo_dir / "eval_margins.jsonl")
    assert -1.0 <= final["rewards/margin_correlation"] <= 1.0
    assert all("reward_difference" in record for record in margins)


@pytest.mark.slow
def test_same_seed_repeats_run(hh_sft_run, hh_file, tmp_path):
    outputs, _, _ = hh_sft_run
    overrides = [*HH_DATA, *QUICK_TRAINING, f"dataset.path={hh_file.parent}",
                 f"outputs_dir={outputs}", "dpo.loss_type=sigmoid"]
    first = dpo.train_dpo(compose_config("dpo", overrides), tmp_path / "first")
    second = dpo.train_dpo(compose_config("dpo", overrides), tmp_path / "second")
    first.pop("pairs_per_second")
    second.pop("pairs_per_second")
    assert first == second


def test_dpo_without_sft_run_fails(tmp_path):
    config = compose_config("dpo", ["wandb.enabled=false", f"outputs_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"Run `python sft.py` first"):
        dpo.train_dpo(config, tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.beta=0", "dpo.beta=0 must be positive"),
        ("dpo.beta=-1.0", "dpo.beta=-1.0 must be positive"),
        ("dpo.loss_type=kto", "Valid loss types: hinge, ipo, rebel, sigmoid"),
        ("dpo.label_smoothing=0.1", "applies only to dpo.loss_type=sigmoid"),
        ("dpo.beta=abc", "dpo.beta='abc' is not a number"),
        ("dataset.max_prompt_length=128", "max_prompt_length=128 must be smaller"),
    ],
)
def test_bad_dpo_settings_fail_at_startup(tmp_path, override, message):
    config = compose_config("dpo", ["wandb.enabled=false", f"outputs_dir={tmp_path}", override])
    with pytest.raises(ValueError, match=message):
        dpo.train_dpo(config, tmp_path)


def test_loss_group_selects_loss_type():
    assert compose_config("dpo", ["loss=ipo"]).dpo.loss_type == "ipo"
    assert compose_config("dpo", ["dpo.loss_type=hinge"]).dpo.loss_type == "hinge"
    assert compose_config("dpo", []).dpo.loss_type == "rebel"
    assert compose_config("dpo", []).dpo.beta == 5.0


def test_run_name_template_resolves_loss_and_beta():
    config = compose_config("dpo", ["dpo.loss_type=ipo", "dpo.beta=0.1"])
    assert config.wandb.run_name == "ipo-beta0.1"


def test_every_yaml_key_has_a_comment():
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or stripped.startswith("- "):
                continue
            assert "#" in line, f"{path.relative_to(REPO_ROOT)}:{number} has no comment: {line}"


def run_cli(*arguments, cwd):
    return subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_cli_sft_then_multirun_dpo(tmp_path):
    """The commands users type: sft.py, then a Hydra multirun over loss and beta."""
    outputs = tmp_path / "outputs"
    common = [*SMALL_SYNTHETIC, *QUICK_TRAINING, f"outputs_dir={outputs}"]
    sft_result = run_cli(str(REPO_ROOT / "sft.py"), *TINY_MODEL, *common, cwd=tmp_path)
    assert sft_result.returncode == 0, sft_result.stderr[-3000:]

    dpo_result = run_cli(str(REPO_ROOT / "dpo.py"), "-m", "dpo.loss_type=sigmoid,rebel",
                         "dpo.beta=0.1,5.0", *common, cwd=tmp_path)
    assert dpo_result.returncode == 0, dpo_result.stderr[-3000:]
    summaries = sorted((outputs / "multirun" / "dpo").glob("*/*/summary.json"))
    runs = {(json.loads(path.read_text())["loss_type"], json.loads(path.read_text())["beta"])
            for path in summaries}
    assert runs == {("sigmoid", 0.1), ("sigmoid", 5.0), ("rebel", 0.1), ("rebel", 5.0)}
    assert "Starting from the newest SFT checkpoint" in dpo_result.stdout + dpo_result.stderr


def test_cli_rejects_unknown_loss_before_loading(tmp_path):
    result = run_cli(str(REPO_ROOT / "dpo.py"), "dpo.loss_type=dpo", "wandb.enabled=false",
                     f"outputs_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    assert "Unknown dpo.loss_type='dpo'" in result.stderr


def test_model_name_without_checkpoint_fails_clearly(tmp_path):
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    config = compose_config("dpo", ["wandb.enabled=false", f"outputs_dir={tmp_path}",
                                    f"model.name={empty}", "dataset.num_pairs=100"])
    with pytest.raises(ValueError, match="is a directory without a Hugging Face checkpoint"):
        dpo.train_dpo(config, tmp_path / "run")
