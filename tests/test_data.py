"""Loading, HH-RLHF parsing, the synthetic set, and tokenization invariants."""

import gzip
import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

import data
import models

MULTI_TURN = (
    "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?"
    "\n\nHuman: Name a fruit.\n\nAssistant:"
)


def dataset_config(**overrides):
    base = {
        "synthetic": False, "num_pairs": None, "seed": 0, "name": None, "data_dir": None,
        "path": None, "train_split": "train", "eval_split": "test", "eval_fraction": 0.1,
        "train_size_limit": None, "eval_size_limit": None, "max_length": 64,
        "max_prompt_length": 32,
    }
    base.update(overrides)
    return OmegaConf.create(base)


@pytest.fixture(scope="module")
def tokenizer():
    pairs = data.build_synthetic_pairs(300, seed=1)
    return models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=400)


# ---------------------------------------------------------------------------
# HH-RLHF parsing
# ---------------------------------------------------------------------------


def test_split_hh_dialogue_keeps_earlier_turns_in_prompt():
    prompt, response = data.split_hh_dialogue(MULTI_TURN + " An apple.")
    assert prompt == MULTI_TURN
    assert response == " An apple."


def test_split_hh_dialogue_without_marker_returns_none():
    assert data.split_hh_dialogue("\n\nHuman: Hello there") is None


def test_hh_row_becomes_pair():
    row = {"chosen": MULTI_TURN + " An apple.", "rejected": MULTI_TURN + " No."}
    pair, reason = data.row_to_pair(row, "row 1")
    assert reason is None
    assert pair.prompt == MULTI_TURN
    assert pair.chosen == " An apple."
    assert pair.rejected == " No."
    assert pair.chosen_reward is None


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("\n\nHuman: A?\n\nAssistant: yes", "\n\nHuman: B?\n\nAssistant: no", "prompt_mismatch"),
        ("\n\nHuman: A?\n\nAssistant:  ", "\n\nHuman: A?\n\nAssistant: no", "empty_response"),
        ("\n\nHuman: A?\n\nAssistant: yes", "\n\nHuman: A?\n\nAssistant:", "empty_response"),
        ("\n\nHuman: A?\n\nAssistant: yes", "\n\nHuman: A?\n\nAssistant: yes",
         "identical_responses"),
        ("\n\nHuman: A? yes", "\n\nHuman: A?\n\nAssistant: no", "missing_assistant_marker"),
    ],
)
def test_defective_hh_rows_are_dropped_with_reason(chosen, rejected, reason):
    pair, dropped_because = data.row_to_pair({"chosen": chosen, "rejected": rejected}, "row")
    assert pair is None
    assert dropped_because == reason


def test_explicit_row_with_rewards():
    row = {"prompt": "Q:", "chosen": " a", "rejected": " b", "chosen_reward": 2,
           "rejected_reward": -1.5}
    pair, _ = data.row_to_pair(row, "row")
    assert pair == data.PreferencePair("Q:", " a", " b", 2.0, -1.5)


def test_row_with_one_reward_is_rejected():
    row = {"prompt": "Q:", "chosen": " a", "rejected": " b", "chosen_reward": 1.0}
    with pytest.raises(data.DataError, match="only one of chosen_reward and rejected_reward"):
        data.row_to_pair(row, "file.jsonl:7")


def test_row_missing_column_names_it():
    with pytest.raises(data.DataError, match=r"file.jsonl:3: missing column 'rejected'"):
        data.row_to_pair({"chosen": "x"}, "file.jsonl:3")


def test_real_hh_rows_drop_counts_are_logged(hh_file, caplog):
    caplog.set_level(logging.INFO, logger="data")
    pairs = data.rows_to_pairs(data.read_rows(hh_file), str(hh_file))
    match = re.search(r"kept (\d+) pairs, dropped (\d+) \((.*)\)", caplog.text)
    assert match is not None
    kept, dropped = int(match.group(1)), int(match.group(2))
    reasons = dict(item.split("=") for item in match.group(3).split(", "))
    assert kept == len(pairs)
    assert kept + dropped == 2312
    assert int(reasons["prompt_mismatch"]) > 0
    assert int(reasons["empty_response"]) > 0
    assert all(pair.prompt.endswith(data.ASSISTANT_MARKER) for pair in pairs)


def test_pairs_with_partial_rewards_are_rejected():
    rows = [({"prompt": "Q:", "chosen": " a", "rejected": " b", "chosen_reward": 1,
              "rejected_reward": 0}, "row 1"),
            ({"prompt": "Q:", "chosen": " c", "rejected": " d"}, "row 2")]
    with pytest.raises(data.DataError, match="1 of 2 pairs have rewards"):
        data.rows_to_pairs(rows, "mixed")


# ---------------------------------------------------------------------------
# File formats
# ---------------------------------------------------------------------------

ROWS = [
    {"prompt": "\n\nHuman: one\n\nAssistant:", "chosen": " yes", "rejected": " no",
     "chosen_reward": 1.0, "rejected_reward": 0.0},
    {"prompt": "\n\nHuman: two\n\nAssistant:", "chosen": " good", "rejected": " bad",
     "chosen_reward": 3.0, "rejected_reward": -2.0},
]
EXPECTED_PAIRS = [data.PreferencePair(**row) for row in ROWS]


def write_rows(path, rows):
    suffix = "".join(path.suffixes)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.json", "pairs.parquet"])
def test_local_file_formats_load_the_same_pairs(tmp_path, name):
    path = tmp_path / name
    write_rows(path, ROWS)
    train, test = data.load_local_pairs(path)
    assert train == EXPECTED_PAIRS
    assert test is None


def test_json_file_holding_json_lines_loads(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    train, _ = data.load_local_pairs(path)
    assert train == EXPECTED_PAIRS


def test_directory_with_train_and_test_files(tmp_path):
    write_rows(tmp_path / "train.jsonl.gz", ROWS[:1])
    write_rows(tmp_path / "test.jsonl.gz", ROWS[1:])
    train, test = data.load_local_pairs(tmp_path)
    assert train == EXPECTED_PAIRS[:1]
    assert test == EXPECTED_PAIRS[1:]


def test_directory_with_only_test_file_is_held_out(hh_file):
    config = dataset_config(path=str(hh_file.parent), eval_fraction=0.1)
    splits = data.load_preference_data(config, seed=0)
    total = len(splits.train) + len(splits.eval)
    assert len(splits.eval) == round(total * 0.1)
    assert not set(splits.train) & set(splits.eval)


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(data.DataError, match=r"broken.jsonl:2: malformed JSON"):
        data.load_local_pairs(path)


def test_missing_path_fails_naming_it(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_local_pairs(tmp_path / "nowhere.jsonl")


def test_no_usable_pairs_fails(tmp_path):
    path = tmp_path / "empty.jsonl"
    write_rows(path, [{"prompt": "Q", "chosen": " same", "rejected": " same"}])
    with pytest.raises(data.DataError, match="no usable training pairs"):
        data.load_preference_data(dataset_config(path=str(path)), seed=0)


def test_no_source_selected_fails():
    with pytest.raises(data.DataError, match="No dataset selected"):
        data.load_preference_data(dataset_config(), seed=0)


def test_size_limits_take_seeded_subsets(tmp_path):
    config = dataset_config(synthetic=True, num_pairs=200, eval_fraction=0.25,
                            train_size_limit=40, eval_size_limit=10)
    first = data.load_preference_data(config, seed=3)
    second = data.load_preference_data(config, seed=3)
    assert len(first.train) == 40
    assert len(first.eval) == 10
    assert first.train == second.train
    assert first.eval == second.eval


# ---------------------------------------------------------------------------
# The synthetic set
# ---------------------------------------------------------------------------


def recompute_synthetic_reward(prompt: str, response: str) -> float:
    """Score a synthetic response from its text alone, following the documented rule."""
    topic = next(name for name in data.SYNTHETIC_TOPICS if name in prompt.split("Human:")[-1])
    opener = next(text for text in data.SYNTHETIC_OPENERS if response.startswith(" " + text))
    items = response[len(opener) + 2:].rstrip(".").split(", ")
    on_topic = sum(item in data.SYNTHETIC_TOPICS[topic] for item in items)
    return on_topic - (len(items) - on_topic) + data.SYNTHETIC_OPENERS[opener]


def test_synthetic_set_is_deterministic():
    assert data.build_synthetic_pairs(500, seed=7) == data.build_synthetic_pairs(500, seed=7)
    assert data.build_synthetic_pairs(500, seed=7) != data.build_synthetic_pairs(500, seed=8)


def test_synthetic_rewards_follow_the_rule():
    pairs = data.build_synthetic_pairs(10_000, seed=0)
    assert len(pairs) == 10_000
    for pair in pairs[:2000]:
        assert pair.chosen_reward > pair.rejected_reward
        assert recompute_synthetic_reward(pair.prompt, pair.chosen) == pair.chosen_reward
        assert recompute_synthetic_reward(pair.prompt, pair.rejected) == pair.rejected_reward


def test_synthetic_prompts_parse_as_hh_dialogues():
    pairs = data.build_synthetic_pairs(200, seed=0)
    for pair in pairs:
        prompt, response = data.split_hh_dialogue(pair.prompt + pair.chosen)
        assert prompt == pair.prompt
        assert response == pair.chosen
    assert any(pair.prompt.count("Human:") == 2 for pair in pairs)


# ---------------------------------------------------------------------------
# Tokenization and batching
# ---------------------------------------------------------------------------

PAIR = data.PreferencePair(
    MULTI_TURN, " Sure, happy to help! apple, cherry.", " Ugh, fine: hammer.", 3.0, -2.0
)


def test_prompt_ids_identical_for_chosen_and_rejected(tokenizer):
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=128, max_prompt_length=64)
    batch = data.PreferenceCollator(tokenizer.pad_token_id)([tokenized])
    prompt_length = len(tokenized.prompt_ids)
    chosen_row, rejected_row = batch["input_ids"]
    assert chosen_row[:prompt_length].tolist() == rejected_row[:prompt_length].tolist()
    assert tokenized.prompt_ids == tokenizer(MULTI_TURN, add_special_tokens=False)["input_ids"]


def test_responses_end_with_eos(tokenizer):
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=64, max_prompt_length=32)
    assert tokenized.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenized.rejected_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tokenized.chosen_ids[:-1]) == PAIR.chosen


def test_labels_mask_prompt_and_padding(tokenizer):
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=64, max_prompt_length=32)
    batch = data.PreferenceCollator(tokenizer.pad_token_id)([tokenized])
    prompt_length = len(tokenized.prompt_ids)
    rejected_length = prompt_length + len(tokenized.rejected_ids)
    chosen_labels, rejected_labels = batch["labels"]
    assert (chosen_labels[:prompt_length] == data.IGNORE_INDEX).all()
    assert chosen_labels[prompt_length:].tolist() == tokenized.chosen_ids
    assert rejected_labels[prompt_length:rejected_length].tolist() == tokenized.rejected_ids
    assert (rejected_labels[rejected_length:] == data.IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum().item() == rejected_length


def test_prompt_truncated_from_the_left(tokenizer):
    full_prompt = tokenizer(MULTI_TURN, add_special_tokens=False)["input_ids"]
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=64, max_prompt_length=5)
    assert len(full_prompt) > 5
    assert tokenized.prompt_ids == full_prompt[-5:]


def test_total_length_capped_at_max_length(tokenizer):
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=12, max_prompt_length=8)
    assert len(tokenized.prompt_ids) + len(tokenized.chosen_ids) == 12
    assert len(tokenized.prompt_ids) + len(tokenized.rejected_ids) <= 12


def test_prompt_limit_must_leave_room_for_response(tokenizer):
    with pytest.raises(data.DataError, match="max_prompt_length=64 must be smaller"):
        data.tokenize_pairs([PAIR], tokenizer, max_length=64, max_prompt_length=64)


def test_collator_carries_reward_differences(tokenizer):
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=64, max_prompt_length=32)
    batch = data.PreferenceCollator(tokenizer.pad_token_id)([tokenized, tokenized])
    assert batch["input_ids"].shape[0] == 4
    assert batch["reward_differences"].tolist() == [5.0, 5.0]


def test_sequence_logps_sum_only_response_tokens(tokenizer):
    model = models.build_tiny_model(
        OmegaConf.create({"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                          "max_position_embeddings": 128}), tokenizer, seed=0)
    tokenized = data.tokenize_pair(PAIR, tokenizer, max_length=64, max_prompt_length=32)
    batch = data.PreferenceCollator(tokenizer.pad_token_id)([tokenized])
    sums, counts = models.sequence_logps(model, batch)

    logits = model(input_ids=batch["input_ids"][:1]).logits[0]
    start = len(tokenized.prompt_ids)
    expected = sum(
        torch.log_softmax(logits[position - 1], dim=-1)[token].item()
        for position, token in enumerate(tokenized.chosen_ids, start=start)
    )
    assert counts.tolist() == [len(tokenized.chosen_ids), len(tokenized.rejected_ids)]
    assert sums[0].item() == pytest.approx(expected, abs=1e-4)


def test_hub_loader_reads_dataset_repository_layout(tmp_path, monkeypatch):
    # load_dataset treats a local directory like a hub repository, so the hub
    # code path (splits, data_dir) runs offline on the same layout.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    subset = tmp_path / "harmless-base"
    subset.mkdir()
    hh_rows = [{"chosen": f"\n\nHuman: q{index}\n\nAssistant: good {index}",
                "rejected": f"\n\nHuman: q{index}\n\nAssistant: bad {index}"} for index in range(4)]
    write_rows(subset / "train.jsonl", hh_rows[:3])
    write_rows(subset / "test.jsonl", hh_rows[3:])
    train, test = data.load_hub_pairs(str(tmp_path), "harmless-base", "train", "test")
    assert [pair.chosen for pair in train] == [" good 0", " good 1", " good 2"]
    assert [pair.rejected for pair in test] == [" bad 3"]


def test_hub_loader_rejects_missing_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_rows(tmp_path / "test.jsonl", ROWS)
    with pytest.raises(data.DataError, match="has no split 'train'"):
        data.load_hub_pairs(str(tmp_path), None, "train", "test")
