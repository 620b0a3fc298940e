"""Length-grouped batching and the tokenized-pair cache."""

import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import data
import models
import training


def random_lengths(count: int, seed: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randint(5, 500) for _ in range(count)]


def grouped_sampler(num_processes=1, process_index=0, accumulation_steps=1, lengths=None):
    lengths = lengths if lengths is not None else random_lengths(50, seed=1)
    return training.GlobalBatchSampler(len(lengths), 8, num_processes, process_index,
                                       accumulation_steps, seed=3, lengths=lengths)


def global_batch(sampler: training.GlobalBatchSampler, step: int) -> list[int]:
    return [index for micro_batch in sampler.step_micro_batches(step) for index in micro_batch]


# ---------------------------------------------------------------------------
# Length-grouped batching
# ---------------------------------------------------------------------------


def test_grouped_epoch_visits_kept_pairs_once():
    sampler = grouped_sampler()
    ungrouped = training.GlobalBatchSampler(50, 8, 1, 0, 1, seed=3)
    visited = [index for step in range(sampler.steps_per_epoch)
               for index in global_batch(sampler, step)]
    ungrouped_visited = [index for step in range(ungrouped.steps_per_epoch)
            for index in global_batch(ungrouped, step)]
    assert len(visited) == 48
    assert len(set(visited)) == 48
    assert set(visited) == set(ungrouped_visited)


def test_grouped_steps_same_for_any_split():
    lengths = random_lengths(50, seed=2)
    single = grouped_sampler(lengths=lengths)
    for step in range(12):  # crosses the epoch boundary at step 6
        expected = global_batch(single, step)
        for num_processes, accumulation_steps in [(2, 1), (2, 2), (4, 2), (1, 8)]:
            indices = []
            for rank in range(num_processes):
                sampler = grouped_sampler(num_processes, rank, accumulation_steps, lengths)
                indices += global_batch(sampler, step)
            assert indices == expected


def test_grouped_order_repeats_for_same_seed():
    first, second = grouped_sampler(), grouped_sampler()
    assert [global_batch(first, step) for step in range(12)] == [
        global_batch(second, step) for step in range(12)
    ]


def test_grouped_epochs_differ():
    sampler = grouped_sampler(lengths=random_lengths(200, seed=4))
    steps = sampler.steps_per_epoch
    first_epoch = [global_batch(sampler, step) for step in range(steps)]
    second_epoch = [global_batch(sampler, step) for step in range(steps, 2 * steps)]
    assert first_epoch != second_epoch


def test_grouped_batches_pad_less():
    lengths = random_lengths(400, seed=5)
    grouped = grouped_sampler(lengths=lengths)
    ungrouped = training.GlobalBatchSampler(400, 8, 1, 0, 1, seed=3)

    def padded_tokens(sampler) -> int:
        return sum(8 * max(lengths[index] for index in global_batch(sampler, step))
                   for step in range(sampler.steps_per_epoch))

    real_tokens = sum(lengths)
    assert padded_tokens(grouped) < 1.1 * real_tokens
    assert padded_tokens(ungrouped) > 1.5 * real_tokens


def test_grouped_micro_batches_sorted_longest_first():
    lengths = random_lengths(50, seed=6)
    sampler = grouped_sampler(accumulation_steps=4, lengths=lengths)
    micro_batches = sampler.step_micro_batches(0)
    batch_lengths = [lengths[index] for micro_batch in micro_batches for index in micro_batch]
    assert batch_lengths == sorted(batch_lengths, reverse=True)


def test_lengths_count_mismatch_rejected():
    with pytest.raises(ValueError, match="lengths has 3 entries for 50 examples"):
        training.GlobalBatchSampler(50, 8, 1, 0, 1, seed=0, lengths=[1, 2, 3])


def test_loader_groups_only_when_configured():
    pairs = [data.TokenizedPair([1] * size, [2], [3, 3], None) for size in range(1, 17)]
    accelerator = training.make_accelerator(OmegaConf.create({
        "batch_size": 8, "micro_batch_size": None, "learning_rate": 1.0, "eval_every": None,
        "mixed_precision": None, "seed": 0,
    }))
    for group_by_length, expected in [(True, [pair.length for pair in pairs]), (False, None)]:
        config = OmegaConf.create({"batch_size": 8, "seed": 0,
                                   "group_by_length": group_by_length})
        loader = training.build_train_loader(pairs, data.PreferenceCollator(0), config,
                                             accelerator)
        assert loader.batch_sampler.lengths == expected


def test_resume_of_older_checkpoint_assumes_ungrouped(tmp_path):
    saved = {"batch_size": 8, "seed": 0, "num_examples": 50}
    training.check_resume_compatible(saved, {**saved, "group_by_length": False}, tmp_path)
    with pytest.raises(ValueError, match="group_by_length=False, but this run has "
                                         "group_by_length=True"):
        training.check_resume_compatible(saved, {**saved, "group_by_length": True}, tmp_path)


# ---------------------------------------------------------------------------
# Tokenized-pair cache
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    pairs = data.build_synthetic_pairs(100, seed=0)
    return models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=300)


@pytest.fixture(scope="module")
def pairs():
    return data.build_synthetic_pairs(20, seed=1)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("tokenized-*.pt"))


def test_cache_miss_writes_file(tmp_path, tokenizer, pairs):
    tokenized = data.tokenize_pairs_cached(pairs, tokenizer, 64, 32, tmp_path)
    assert tokenized == data.tokenize_pairs(pairs, tokenizer, 64, 32)
    assert len(cache_files(tmp_path)) == 1
    assert not list(tmp_path.glob(".*partial"))


def test_cache_hit_loads_same_pairs(tmp_path, tokenizer, pairs, caplog):
    first = data.tokenize_pairs_cached(pairs, tokenizer, 64, 32, tmp_path)
    with caplog.at_level("INFO", logger="data"):
        second = data.tokenize_pairs_cached(pairs, tokenizer, 64, 32, tmp_path)
    assert second == first
    assert "Loaded 20 tokenized pairs" in caplog.text


def test_cache_key_covers_data_tokenizer_and_lengths(tokenizer, pairs):
    base = data.tokenized_cache_key(pairs, tokenizer, 64, 32)
    other_tokenizer = models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=280)
    changed_pair = data.PreferencePair(pairs[0].prompt, pairs[0].chosen + " x", pairs[0].rejected)
    assert data.tokenized_cache_key(pairs, tokenizer, 64, 32) == base
    assert data.tokenized_cache_key(pairs, tokenizer, 65, 32) != base
    assert data.tokenized_cache_key(pairs, tokenizer, 64, 31) != base
    assert data.tokenized_cache_key(pairs, other_tokenizer, 64, 32) != base
    assert data.tokenized_cache_key([changed_pair, *pairs[1:]], tokenizer, 64, 32) != base


def test_corrupt_cache_file_rebuilt(tmp_path, tokenizer, pairs, caplog):
    expected = data.tokenize_pairs_cached(pairs, tokenizer, 64, 32, tmp_path)
    [path] = cache_files(tmp_path)
    path.write_bytes(path.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="data"):
        rebuilt = data.tokenize_pairs_cached(pairs, tokenizer, 64, 32, tmp_path)
    assert rebuilt == expected
    assert "unreadable" in caplog.text
    assert [data.TokenizedPair(*row) for row in torch.load(path, weights_only=True)] == expected


def test_cache_dir_none_writes_nothing(tmp_path, tokenizer, pairs):
    tokenized = data.tokenize_pairs_cached(pairs, tokenizer, 64, 32, None)
    assert tokenized == data.tokenize_pairs(pairs, tokenizer, 64, 32)
    assert list(tmp_path.iterdir()) == []
