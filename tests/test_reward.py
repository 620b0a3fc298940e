"""Reward models: the Bradley-Terry loss, where the reward is read, scoring and relabelling.

The models are tiny GPT-NeoX networks with random weights and a BPE tokenizer
trained on the synthetic set. The HH rows are the first rows of the real
HH-RLHF test file, copied to a temporary directory.
"""

import copy
import gzip
import itertools
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import compose_config
from transformers import (
    AutoModelForSequenceClassification,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXForSequenceClassification,
)

import data
import dpo
import losses
import models
import reward
import training

HH_SUBSET_ROWS = 40  # rows of the shared HH file that the scoring tests use


def tiny_network_config(tokenizer, **options) -> GPTNeoXConfig:
    return GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )


def save_model(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    pairs = data.build_synthetic_pairs(200, seed=0)
    return models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=400)


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(tiny_network_config(tokenizer, num_labels=1))
    return model.eval()


@pytest.fixture(scope="module")
def reward_model_dir(reward_model, tokenizer, tmp_path_factory) -> Path:
    return save_model(reward_model, tokenizer, tmp_path_factory.mktemp("reward_model"))


@pytest.fixture(scope="module")
def causal_lm_dir(tokenizer, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(tiny_network_config(tokenizer))
    return save_model(model, tokenizer, tmp_path_factory.mktemp("causal_lm"))


@pytest.fixture(scope="module")
def hh_subset_file(tmp_path_factory, hh_file) -> Path:
    """The first HH_SUBSET_ROWS rows of the shared HH-RLHF file, as a .jsonl.gz file."""
    path = tmp_path_factory.mktemp("hh") / "test.jsonl.gz"
    with gzip.open(hh_file, "rt", encoding="utf-8") as source, \
            gzip.open(path, "wt", encoding="utf-8") as target:
        target.writelines(itertools.islice(source, HH_SUBSET_ROWS))
    return path


def score_config(dataset_path: Path | None, reward_model_path: Path, output: Path, *extra: str):
    """Compose a score job config; dataset_path=None leaves the source to `extra`."""
    source = [] if dataset_path is None else [f"dataset.path={dataset_path}"]
    return compose_config("reward", [
        "reward.job=score",
        f"reward.model={reward_model_path}",
        f"reward.output={output}",
        "reward.batch_size=8",
        "dataset=hh_rlhf",
        *source,
        "dataset.max_length=128",
        "dataset.max_prompt_length=64",
        "wandb.enabled=false",
        *extra,
    ])


def score(dataset_path: Path | None, reward_model_path: Path, output: Path, *extra: str) -> Path:
    """Run the score job into `output` and return it."""
    config = score_config(dataset_path, reward_model_path, output, *extra)
    return reward.score_dataset(config, output.parent)


@pytest.fixture(scope="module")
def scored_hh_dir(hh_subset_file, reward_model_dir, tmp_path_factory) -> Path:
    return score(hh_subset_file, reward_model_dir, tmp_path_factory.mktemp("scored") / "scored")


def write_json_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------


def test_bradley_terry_loss_hand_values():
    chosen = torch.tensor([0.0, 1.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, 0.0, 2.0, 3.5])

    pair_losses = losses.bradley_terry_loss(chosen, rejected)

    assert pair_losses[0].item() == pytest.approx(math.log(2.0))
    assert pair_losses[1].item() == pytest.approx(math.log(1.0 + math.exp(-1.0)))
    assert pair_losses[2].item() == pytest.approx(math.log(1.0 + math.exp(2.0)))
    assert pair_losses[3].item() == pytest.approx(math.log(1.0 + math.exp(0.5)))


def test_bradley_terry_loss_finite_at_large_margins():
    pair_losses = losses.bradley_terry_loss(torch.tensor([0.0, 200.0]), torch.tensor([200.0, 0.0]))

    assert pair_losses[0].item() == pytest.approx(200.0)
    assert pair_losses[1].item() == pytest.approx(0.0, abs=1e-30)


def test_bradley_terry_loss_gradient():
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.0])

    losses.bradley_terry_loss(chosen, rejected).sum().backward()

    assert chosen.grad.item() == pytest.approx(-1.0 / (1.0 + math.e))


# ---------------------------------------------------------------------------
# Where the reward is read
# ---------------------------------------------------------------------------


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str):
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = 0 if side == "right" else width - len(sequence)
        columns = slice(start, start + len(sequence))
        input_ids[row, columns] = torch.tensor(sequence)
        attention_mask[row, columns] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def per_token_rewards(model, batch) -> torch.Tensor:
    hidden = model.gpt_neox(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
    return model.score(hidden)[..., 0]


@pytest.fixture(scope="module")
def sequences(tokenizer) -> list[list[int]]:
    texts = [" Sure, happy to help! apple, mango.", " Okay: drum.", " Ugh, fine: red, tiger, golf."]
    return [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]


@pytest.mark.parametrize("side", ["right", "left"])
def test_reward_read_at_last_real_token(reward_model, tokenizer, sequences, side):
    batch = pad_batch(sequences, tokenizer.pad_token_id, side)
    last_real = batch["attention_mask"].shape[1] - 1 - batch["attention_mask"].flip(1).argmax(1)

    with torch.no_grad():
        rewards = reward.sequence_rewards(reward_model, batch)
        expected = per_token_rewards(reward_model, batch)[torch.arange(len(sequences)), last_real]

    for row in range(len(sequences)):
        assert rewards[row].item() == pytest.approx(expected[row].item(), abs=1e-6)


def test_right_padded_reward_equals_unpadded(reward_model, tokenizer, sequences):
    batch = pad_batch(sequences, tokenizer.pad_token_id, "right")

    with torch.no_grad():
        padded = reward.sequence_rewards(reward_model, batch)
        alone = [
            reward.sequence_rewards(
                reward_model, pad_batch([sequence], tokenizer.pad_token_id, "right")
            ).item()
            for sequence in sequences
        ]

    for row in range(len(sequences)):
        assert padded[row].item() == pytest.approx(alone[row], abs=1e-5)


def test_load_reward_model_sets_pad_token_id(tokenizer, tmp_path):
    network_config = tiny_network_config(tokenizer, num_labels=1)
    network_config.pad_token_id = None
    model_dir = save_model(GPTNeoXForSequenceClassification(network_config), tokenizer, tmp_path)
    model_config = compose_config("reward", []).model

    model = reward.load_reward_model(str(model_dir), tokenizer, model_config)

    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_reward_read_before_eos_when_pad_is_eos(reward_model, tokenizer, sequences):
    """With pad = EOS (as for Pythia), the read is at the last token before EOS."""
    model = copy.deepcopy(reward_model)
    model.config.pad_token_id = tokenizer.eos_token_id
    batch = pad_batch(sequences, tokenizer.eos_token_id, "right")
    before_eos = batch["attention_mask"].sum(1) - 2

    with torch.no_grad():
        rewards = reward.sequence_rewards(model.eval(), batch)
        expected = per_token_rewards(model, batch)[torch.arange(len(sequences)), before_eos]

    for row in range(len(sequences)):
        assert rewards[row].item() == pytest.approx(expected[row].item(), abs=1e-6)


# ---------------------------------------------------------------------------
# Relabelling
# ---------------------------------------------------------------------------


def test_relabel_swaps_only_disagreeing_rows():
    rows = [
        {"chosen": "a", "rejected": "b", "chosen_reward": 2.0, "rejected_reward": 1.0},
        {"chosen": "c", "rejected": "d", "chosen_reward": 0.0, "rejected_reward": 3.0},
        {"chosen": "e", "rejected": "f", "chosen_reward": 1.0, "rejected_reward": 1.0},
        {"chosen": "g", "rejected": "h", "chosen_reward": -1.0, "rejected_reward": -0.5,
         "original_chosen_reward": 4.0, "original_rejected_reward": 5.0},
    ]

    relabelled, swapped = reward.relabel_rows(rows)

    assert swapped == 2
    assert [row["relabelled"] for row in relabelled] == [False, True, False, True]
    assert [row["chosen"] for row in relabelled] == ["a", "d", "e", "h"]
    assert [row["rejected"] for row in relabelled] == ["b", "c", "f", "g"]
    assert relabelled[1]["chosen_reward"] == 3.0
    assert relabelled[1]["rejected_reward"] == 0.0
    assert relabelled[3]["original_chosen_reward"] == 5.0
    assert relabelled[3]["original_rejected_reward"] == 4.0
    assert rows[1]["chosen"] == "c"  # the input rows are left unchanged


# ---------------------------------------------------------------------------
# Scoring files
# ---------------------------------------------------------------------------


def test_scored_file_round_trips_through_data(hh_subset_file, scored_hh_dir):
    table = pq.read_table(scored_hh_dir / "train.parquet").to_pylist()
    original_pairs = data.rows_to_pairs(data.read_rows(hh_subset_file), str(hh_subset_file))

    scored_pairs = data.rows_to_pairs(data.read_rows(scored_hh_dir / "train.parquet"), "scored")

    assert len(scored_pairs) == len(original_pairs)
    assert [pair.prompt for pair in scored_pairs] == [pair.prompt for pair in original_pairs]
    assert [pair.chosen for pair in scored_pairs] == [pair.chosen for pair in original_pairs]
    assert [pair.rejected for pair in scored_pairs] == [pair.rejected for pair in original_pairs]
    assert [pair.chosen_reward for pair in scored_pairs] == [row["chosen_reward"] for row in table]
    assert [pair.rejected_reward for pair in scored_pairs] == [row["rejected_reward"]
                                                               for row in table]


def test_scored_file_keeps_original_columns(hh_subset_file, scored_hh_dir):
    with gzip.open(hh_subset_file, "rt", encoding="utf-8") as lines:
        first_row = json.loads(next(lines))

    table = pq.read_table(scored_hh_dir / "train.parquet")
    summary = json.loads((scored_hh_dir / reward.SCORING_SUMMARY_FILE).read_text())

    assert table.column_names == ["chosen", "rejected", "chosen_reward", "rejected_reward"]
    assert table.column("chosen")[0].as_py() == first_row["chosen"]
    assert summary["rows"] == table.num_rows
    assert summary["splits"]["train"]["rows"] == table.num_rows


def test_scored_directory_loads_with_dataset_path(scored_hh_dir):
    table = pq.read_table(scored_hh_dir / "train.parquet").to_pylist()
    rewards = {(row["chosen"], row["chosen_reward"]) for row in table}
    overrides = ["dataset=hh_rlhf", f"dataset.path={scored_hh_dir}"]

    splits = data.load_preference_data(compose_config("dpo", overrides).dataset, seed=0)

    assert splits.has_rewards
    assert len(splits.train) + len(splits.eval) == len(table)
    for pair in splits.train + splits.eval:
        assert (pair.prompt + pair.chosen, pair.chosen_reward) in rewards


def test_scored_file_keeps_held_out_pairs(hh_subset_file, scored_hh_dir):
    """With the same seed, training on the scored copy holds out the same pairs."""
    source = compose_config("dpo", ["dataset=hh_rlhf", f"dataset.path={hh_subset_file}"])
    scored = compose_config("dpo", ["dataset=hh_rlhf", f"dataset.path={scored_hh_dir}"])

    source_splits = data.load_preference_data(source.dataset, seed=0)
    scored_splits = data.load_preference_data(scored.dataset, seed=0)

    assert [pair.chosen for pair in scored_splits.eval] == \
        [pair.chosen for pair in source_splits.eval]
    assert [pair.chosen for pair in scored_splits.train] == \
        [pair.chosen for pair in source_splits.train]


def test_reward_scale_multiplies_loaded_rewards(scored_hh_dir):
    overrides = ["dataset=hh_rlhf", f"dataset.path={scored_hh_dir}"]
    plain = data.load_preference_data(compose_config("dpo", overrides).dataset, seed=0)

    scaled = data.load_preference_data(
        compose_config("dpo", [*overrides, "dataset.reward_scale=2.5"]).dataset, seed=0
    )

    for plain_pair, scaled_pair in zip(plain.train, scaled.train, strict=True):
        assert scaled_pair.chosen_reward == pytest.approx(2.5 * plain_pair.chosen_reward)
        assert scaled_pair.rejected_reward == pytest.approx(2.5 * plain_pair.rejected_reward)


def test_dpo_logs_scaled_reward_differences(caplog):
    overrides = ["dataset.num_pairs=200"]
    plain = data.load_preference_data(compose_config("dpo", overrides).dataset, seed=0)
    scaled = data.load_preference_data(
        compose_config("dpo", [*overrides, "dataset.reward_scale=2.0"]).dataset, seed=0
    )
    differences = torch.tensor([pair.chosen_reward - pair.rejected_reward for pair in plain.train])

    with caplog.at_level("INFO", logger="dpo"):
        dpo.log_reward_statistics(scaled)

    expected = f"mean {2 * float(differences.mean()):.4g}, std {2 * float(differences.std()):.4g}"
    assert expected in caplog.text


@pytest.mark.parametrize("reward_scale", ["0", "-1.0", "nan"])
def test_reward_scale_must_be_positive(reward_scale):
    dataset_config = compose_config("dpo", [f"dataset.reward_scale={reward_scale}"]).dataset

    with pytest.raises(data.DataError, match="dataset.reward_scale"):
        data.load_preference_data(dataset_config, seed=0)


def test_scoring_twice_gives_identical_rewards(hh_subset_file, reward_model_dir, scored_hh_dir,
                                               tmp_path):
    again = score(hh_subset_file, reward_model_dir, tmp_path / "again")

    first_table = pq.read_table(scored_hh_dir / "train.parquet")
    second_table = pq.read_table(again / "train.parquet")

    assert first_table.column("chosen_reward").to_pylist() == \
        second_table.column("chosen_reward").to_pylist()
    assert first_table.column("rejected_reward").to_pylist() == \
        second_table.column("rejected_reward").to_pylist()


def test_batched_scoring_matches_single_pairs(hh_subset_file, reward_model_dir, scored_hh_dir,
                                            tmp_path):
    single = score(hh_subset_file, reward_model_dir, tmp_path / "single", "reward.batch_size=1")

    batched_table = pq.read_table(scored_hh_dir / "train.parquet")
    single_table = pq.read_table(single / "train.parquet")

    assert single_table.column("chosen_reward").to_pylist() == \
        pytest.approx(batched_table.column("chosen_reward").to_pylist(), abs=1e-5)
    assert single_table.column("rejected_reward").to_pylist() == \
        pytest.approx(batched_table.column("rejected_reward").to_pylist(), abs=1e-5)


def test_relabel_option_writes_swapped_rows(hh_subset_file, reward_model_dir, scored_hh_dir,
                                            tmp_path):
    plain_rows = pq.read_table(scored_hh_dir / "train.parquet").to_pylist()
    disagreeing = [row["rejected_reward"] > row["chosen_reward"] for row in plain_rows]
    relabelled = score(hh_subset_file, reward_model_dir, tmp_path / "relabelled",
                       "reward.relabel=true")

    rows = pq.read_table(relabelled / "train.parquet").to_pylist()
    summary = json.loads((relabelled / reward.SCORING_SUMMARY_FILE).read_text())

    assert any(disagreeing)  # the random reward model disagrees with some labels
    assert [row["relabelled"] for row in rows] == disagreeing
    assert summary["splits"]["train"]["relabelled"] == sum(disagreeing)
    for row, plain_row, swapped in zip(rows, plain_rows, disagreeing, strict=True):
        assert row["chosen"] == (plain_row["rejected"] if swapped else plain_row["chosen"])
        assert row["chosen_reward"] >= row["rejected_reward"]


def test_score_keeps_test_split_of_a_directory(hh_rows, reward_model_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    write_json_lines(source / "train.jsonl", hh_rows[:30])
    write_json_lines(source / "test.jsonl", hh_rows[30:40])
    output = score(source, reward_model_dir, tmp_path / "scored")

    assert pq.read_table(output / "train.parquet").num_rows == 30
    assert pq.read_table(output / "test.parquet").num_rows == 10


def test_score_reads_hub_dataset_layout(hh_rows, reward_model_dir, tmp_path, monkeypatch):
    # load_dataset reads a local directory like a hub repository, so the hub
    # code path runs offline on the same layout.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    subset = tmp_path / "hub" / "harmless-base"
    subset.mkdir(parents=True)
    rows = [{**row, "id": index} for index, row in enumerate(hh_rows[:12])]
    write_json_lines(subset / "train.jsonl", rows[:8])
    write_json_lines(subset / "test.jsonl", rows[8:])

    output = score(None, reward_model_dir, tmp_path / "scored",
                   f"dataset.name={tmp_path / 'hub'}", "dataset.data_dir=harmless-base")
    train_table = pq.read_table(output / "train.parquet")
    test_table = pq.read_table(output / "test.parquet")

    assert train_table.column("id").to_pylist() == list(range(8))
    assert test_table.column("id").to_pylist() == list(range(8, 12))
    assert "chosen_reward" in test_table.column_names


def test_rejudged_config_loads_assumed_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"chosen": f"\n\nHuman: q{index}\n\nAssistant: good {index}",
             "rejected": f"\n\nHuman: q{index}\n\nAssistant: bad {index}",
             "chosen_reward": 1.5 + index, "rejected_reward": -0.5} for index in range(4)]
    write_json_lines(tmp_path / "train.jsonl", rows[:3])
    write_json_lines(tmp_path / "test.jsonl", rows[3:])
    config = compose_config("dpo", ["dataset=hh_rlhf_rejudged", f"dataset.name={tmp_path}",
                                    "loss=rebel"])

    splits = data.load_preference_data(config.dataset, seed=0)

    assert splits.has_rewards
    assert [pair.prompt for pair in splits.train] == [f"\n\nHuman: q{index}\n\nAssistant:"
                                                      for index in range(3)]
    assert [pair.chosen_reward for pair in splits.train] == [1.5, 2.5, 3.5]
    assert [pair.rejected_reward for pair in splits.eval] == [-0.5]


def test_score_keeps_old_rewards_as_original(reward_model_dir, tmp_path):
    source = write_json_lines(tmp_path / "rows.jsonl", [
        {"prompt": "\n\nHuman: Name a fruit.\n\nAssistant:", "chosen": " apple.",
         "rejected": " drum.", "chosen_reward": 3.0, "rejected_reward": -1.0},
        {"prompt": "\n\nHuman: Name a tool.\n\nAssistant:", "chosen": " saw.",
         "rejected": " plum.", "chosen_reward": 2.0, "rejected_reward": 0.0},
    ])

    output = score(source, reward_model_dir, tmp_path / "scored")
    rows = pq.read_table(output / "train.parquet").to_pylist()

    assert [row["original_chosen_reward"] for row in rows] == [3.0, 2.0]
    assert [row["original_rejected_reward"] for row in rows] == [-1.0, 0.0]
    assert rows[0]["chosen_reward"] != 3.0


# ---------------------------------------------------------------------------
# Errors raised before scoring
# ---------------------------------------------------------------------------


def test_score_rejects_multi_output_head(hh_subset_file, tokenizer, tmp_path):
    model = GPTNeoXForSequenceClassification(tiny_network_config(tokenizer, num_labels=2))
    model_dir = save_model(model, tokenizer, tmp_path / "two_outputs")
    output = tmp_path / "scored"

    with pytest.raises(reward.RewardModelError, match="head with 2 outputs"):
        reward.score_dataset(score_config(hh_subset_file, model_dir, output), tmp_path)
    assert not output.exists()


def test_score_rejects_causal_lm_checkpoint(hh_subset_file, causal_lm_dir, tmp_path):
    output = tmp_path / "scored"

    with pytest.raises(reward.RewardModelError, match="GPTNeoXForCausalLM checkpoint"):
        reward.score_dataset(score_config(hh_subset_file, causal_lm_dir, output), tmp_path)
    assert not output.exists()


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_score_rejects_rows_without_column(reward_model_dir, tmp_path, missing, monkeypatch):
    row = {"prompt": "\n\nHuman: Hi.\n\nAssistant:", "chosen": " Hello.", "rejected": " Go."}
    del row[missing]
    source = write_json_lines(tmp_path / "rows.jsonl", [row])
    output = tmp_path / "scored"

    def fail_if_loaded(*arguments, **options):
        raise AssertionError("the reward model was loaded before the data was checked")

    monkeypatch.setattr(reward, "load_reward_model", fail_if_loaded)
    with pytest.raises(data.DataError, match=f"missing column '{missing}'"):
        reward.score_dataset(score_config(source, reward_model_dir, output), tmp_path)
    assert not output.exists()


def test_unknown_job_is_rejected():
    config = compose_config("reward", ["reward.job=rejudge"])

    with pytest.raises(ValueError, match="reward.job='rejudge' is not one of train, score"):
        reward.validate_reward_config(config)


def test_score_without_reward_model_names_the_fix(tmp_path):
    config = compose_config("reward", ["reward.job=score", f"outputs_dir={tmp_path}"])

    with pytest.raises(FileNotFoundError, match="reward.job=train"):
        reward.score_dataset(config, tmp_path)


# ---------------------------------------------------------------------------
# Training, then REBEL on the scored data
# ---------------------------------------------------------------------------


def train_config(causal_lm_dir: Path, outputs_dir: Path, *extra: str):
    return compose_config("reward", [
        f"model.name={causal_lm_dir}",
        f"outputs_dir={outputs_dir}",
        "dataset.num_pairs=300",
        "training.batch_size=16",
        "training.max_steps=4",
        "training.eval_every=2",
        "training.warmup_steps=1",
        "wandb.enabled=false",
        *extra,
    ])


@pytest.mark.slow
def test_train_saves_loadable_reward_model(causal_lm_dir, tmp_path):
    run_dir = tmp_path / "reward_run"
    config = train_config(causal_lm_dir, tmp_path, "training.save_every=2")

    final_metrics = reward.train_reward_model(config, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")

    assert 0.0 <= final_metrics["accuracy"] <= 1.0
    assert [record["step"] for record in records if record["split"] == "eval"] == [0, 2, 4]
    assert all("accuracy" in record for record in records)
    assert loaded.config.num_labels == 1
    assert loaded.config.pad_token_id is not None
    assert reward.newest_reward_model(tmp_path) == run_dir / "model"
    assert training.find_resume_checkpoint(True, tmp_path, reward.STAGE) == \
        run_dir / "checkpoints" / "step-000004"


@pytest.mark.slow
def test_rebel_trains_on_scored_data(causal_lm_dir, hh_subset_file, tmp_path):
    reward_run = tmp_path / "reward_run"
    reward_run.mkdir()
    reward.train_reward_model(
        train_config(causal_lm_dir, tmp_path, "dataset=hh_rlhf", f"dataset.path={hh_subset_file}",
                     "dataset.max_length=128", "dataset.max_prompt_length=64",
                     "training.batch_size=8"),
        reward_run,
    )
    scored = tmp_path / "scored"
    reward.score_dataset(score_config(hh_subset_file, reward_run / "model", scored), tmp_path)
    dpo_run = tmp_path / "dpo_run"
    dpo_run.mkdir()
    dpo_config = compose_config("dpo", [
        "dpo.loss_type=rebel", f"model.name={causal_lm_dir}", "dataset=hh_rlhf",
        f"dataset.path={scored}", "dataset.max_length=128", "dataset.max_prompt_length=64",
        "dataset.eval_fraction=0.25", "training.batch_size=8", "training.max_steps=2",
        "training.warmup_steps=1", "wandb.enabled=false",
    ])

    final_metrics = dpo.train_dpo(dpo_config, dpo_run)

    assert "rewards/margin_correlation" in final_metrics
    assert -1.0 <= final_metrics["rewards/margin_correlation"] <= 1.0
