"""Reference log-prob cache: keys, hits and misses, corrupt files, and equal losses."""

import functools
import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

import data
import dpo
import losses
import models
import reference_cache

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
NUM_PAIRS = 24
BATCH_SIZE = 8
KEY = "k" * 64


def build_checkpoint(directory: Path, pairs: list[data.PreferencePair], seed: int) -> Path:
    """Save a tiny GPT-NeoX with random weights and a BPE tokenizer trained on `pairs`."""
    tokenizer = models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=300)
    architecture = type("Architecture", (), {"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                             "max_position_embeddings": 256})
    model = models.build_tiny_model(architecture, tokenizer, seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def synthetic_pairs() -> list[data.PreferencePair]:
    return data.build_synthetic_pairs(NUM_PAIRS, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, synthetic_pairs) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("reference"), synthetic_pairs, seed=0)


@pytest.fixture(scope="module")
def tokenized(checkpoint, synthetic_pairs) -> dict[str, list[data.TokenizedPair]]:
    tokenizer = models.load_tokenizer(str(checkpoint), trust_remote_code=False)
    pairs = data.tokenize_pairs(synthetic_pairs, tokenizer, max_length=64, max_prompt_length=32)
    return {"train": pairs[:18], "eval": pairs[18:]}


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


class CountingLoader:
    """Load the reference from `checkpoint` and count how often that happens."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = checkpoint
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return models.load_causal_lm(str(self.checkpoint), "float32", trust_remote_code=False)


def cached(cache_dir: Path, key: str, pairs, loader: CountingLoader, accelerator):
    return reference_cache.cached_reference_logps(
        cache_dir=cache_dir, key=key, pairs=pairs, load_reference=loader,
        pad_token_id=1, batch_size=BATCH_SIZE, accelerator=accelerator,
    )


@pytest.fixture(scope="module")
def stored_cache(tmp_path_factory, checkpoint, tokenized, accelerator):
    """A cache file computed once under KEY, and its log-probs; tests copy it."""
    directory = tmp_path_factory.mktemp("stored-cache")
    logps = cached(directory, KEY, tokenized, CountingLoader(checkpoint), accelerator)
    return directory / f"{KEY}.safetensors", logps


def copy_cache(stored_cache, directory: Path, key: str = KEY) -> Path:
    path = directory / f"{key}.safetensors"
    path.write_bytes(stored_cache[0].read_bytes())
    return path


def assert_same_logps(first: dict, second: dict) -> None:
    for split in reference_cache.SPLITS:
        for field in reference_cache.FIELDS:
            assert torch.equal(getattr(first[split], field), getattr(second[split], field)), field


# ---------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------


def key_for(checkpoint, tokenized, dtype="float32", mixed_precision="no") -> str:
    return reference_cache.cache_key(str(checkpoint), tokenized["train"], tokenized["eval"],
                                     dtype, mixed_precision)


def test_key_same_for_same_inputs(checkpoint, tokenized):
    assert key_for(checkpoint, tokenized) == key_for(checkpoint, tokenized)


def test_key_changes_with_checkpoint_weights(tmp_path, checkpoint, tokenized, synthetic_pairs):
    other = build_checkpoint(tmp_path / "other", synthetic_pairs, seed=1)
    assert key_for(other, tokenized) != key_for(checkpoint, tokenized)


def test_key_ignores_checkpoint_location(tmp_path, checkpoint, tokenized, synthetic_pairs):
    copy = build_checkpoint(tmp_path / "copy", synthetic_pairs, seed=0)
    assert key_for(copy, tokenized) == key_for(checkpoint, tokenized)


def test_key_changes_with_tokens(checkpoint, tokenized):
    first = tokenized["train"][0]
    shortened = data.TokenizedPair(first.prompt_ids, first.chosen_ids[:-1], first.rejected_ids,
                                   first.reward_difference)
    changed = {"train": [shortened, *tokenized["train"][1:]], "eval": tokenized["eval"]}
    assert key_for(checkpoint, changed) != key_for(checkpoint, tokenized)


def test_key_changes_with_split_membership(checkpoint, tokenized):
    moved = {"train": tokenized["train"][:-1],
             "eval": [tokenized["train"][-1], *tokenized["eval"]]}
    assert key_for(checkpoint, moved) != key_for(checkpoint, tokenized)


def test_key_changes_with_dtype(checkpoint, tokenized):
    assert key_for(checkpoint, tokenized, dtype="bfloat16") != key_for(checkpoint, tokenized)


def test_key_changes_with_mixed_precision(checkpoint, tokenized):
    assert (key_for(checkpoint, tokenized, mixed_precision="bf16")
            != key_for(checkpoint, tokenized))


def test_key_without_weights_raises(tmp_path, tokenized):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="dpo.precompute_ref_logps=false"):
        key_for(tmp_path, tokenized)


# ---------------------------------------------------------------------------
# Hits, misses and corrupt files
# ---------------------------------------------------------------------------


def test_miss_loads_reference_once(tmp_path, checkpoint, tokenized, accelerator):
    loader = CountingLoader(checkpoint)
    cached(tmp_path, "k" * 64, tokenized, loader, accelerator)
    assert loader.calls == 1
    assert (tmp_path / f"{'k' * 64}.safetensors").is_file()


def test_hit_skips_reference(tmp_path, checkpoint, tokenized, accelerator, caplog,
                             stored_cache):
    copy_cache(stored_cache, tmp_path)
    loader = CountingLoader(checkpoint)
    with caplog.at_level(logging.INFO, logger="reference_cache"):
        loaded = cached(tmp_path, KEY, tokenized, loader, accelerator)
    assert loader.calls == 0
    assert "cache hit" in caplog.text
    assert_same_logps(loaded, stored_cache[1])


def test_other_key_misses(tmp_path, checkpoint, tokenized, accelerator, stored_cache):
    copy_cache(stored_cache, tmp_path)
    loader = CountingLoader(checkpoint)
    cached(tmp_path, "b" * 64, tokenized, loader, accelerator)
    assert loader.calls == 1


def test_cached_values_match_reference_pass(checkpoint, tokenized, stored_cache):
    logps = stored_cache[1]
    reference = models.load_causal_lm(str(checkpoint), "float32", trust_remote_code=False)
    pairs = tokenized["eval"][:3]
    batch = data.PreferenceCollator(pad_token_id=1)(pairs)
    with torch.no_grad():
        expected, counts = models.sequence_logps(reference, batch)
    torch.testing.assert_close(logps["eval"].chosen_logps[:3], expected[:3])
    torch.testing.assert_close(logps["eval"].rejected_logps[:3], expected[3:])
    assert torch.equal(logps["eval"].chosen_token_counts[:3], counts[:3])


def corrupt_by_truncation(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def corrupt_by_bit_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))


def corrupt_by_garbage(path: Path) -> None:
    path.write_bytes(b"not a safetensors file")


def corrupt_by_empty_file(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [corrupt_by_truncation, corrupt_by_bit_flip,
                                     corrupt_by_garbage, corrupt_by_empty_file])
def test_corrupt_file_rebuilt(tmp_path, checkpoint, tokenized, accelerator, caplog, corrupt,
                              stored_cache):
    corrupt(copy_cache(stored_cache, tmp_path))

    loader = CountingLoader(checkpoint)
    with caplog.at_level(logging.WARNING, logger="reference_cache"):
        rebuilt = cached(tmp_path, KEY, tokenized, loader, accelerator)
    assert loader.calls == 1
    assert "is invalid" in caplog.text
    assert_same_logps(rebuilt, stored_cache[1])
    reloaded = reference_cache.load_cache(tmp_path / f"{KEY}.safetensors", KEY, tokenized)
    assert_same_logps(reloaded, stored_cache[1])


def test_file_under_other_key_rejected(tmp_path, tokenized, stored_cache):
    copy_cache(stored_cache, tmp_path, key="b" * 64)
    with pytest.raises(reference_cache.CorruptCacheError, match="key"):
        reference_cache.load_cache(tmp_path / f"{'b' * 64}.safetensors", "b" * 64, tokenized)


def test_file_with_wrong_pair_count_rejected(tmp_path, tokenized):
    key = KEY
    short = {split: reference_cache.ReferenceLogps(
        torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.int64),
        torch.ones(2, dtype=torch.int64)) for split in reference_cache.SPLITS}
    reference_cache.save_cache(tmp_path / f"{key}.safetensors", key, short)
    with pytest.raises(reference_cache.CorruptCacheError, match="shape"):
        reference_cache.load_cache(tmp_path / f"{key}.safetensors", key, tokenized)


def test_token_count_mismatch_rejected(tmp_path, tokenized, stored_cache):
    key, logps = KEY, stored_cache[1]
    tensors = {f"{split}/{field}": getattr(logps[split], field)
               for split in reference_cache.SPLITS for field in reference_cache.FIELDS}
    tensors["train/chosen_token_counts"] = tensors["train/chosen_token_counts"] + 1
    metadata = {"format": reference_cache.FORMAT_VERSION, "key": key,
                "checksum": reference_cache.tensors_checksum(tensors)}
    save_file(tensors, tmp_path / f"{key}.safetensors", metadata=metadata)
    with pytest.raises(reference_cache.CorruptCacheError, match="token counts"):
        reference_cache.load_cache(tmp_path / f"{key}.safetensors", key, tokenized)


def test_save_leaves_no_partial_files(stored_cache):
    names = sorted(path.name for path in stored_cache[0].parent.iterdir())
    assert names == [f"{KEY}.safetensors", f"{KEY}.safetensors.lock"]


# ---------------------------------------------------------------------------
# Losses with and without the cache
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tmp_path_factory, synthetic_pairs):
    """A model with other weights than the reference, so the log-ratios are not zero."""
    directory = build_checkpoint(tmp_path_factory.mktemp("policy"), synthetic_pairs, seed=3)
    return models.load_causal_lm(str(directory), "float32", trust_remote_code=False)


@pytest.mark.parametrize("loss_type", sorted(losses.LOSSES))
def test_step_loss_equal_with_cache(checkpoint, tokenized, policy, stored_cache, loss_type):
    spec = losses.get_loss(loss_type)
    loss_function = functools.partial(spec.function, beta=0.5)
    reference = models.load_causal_lm(str(checkpoint), "float32", trust_remote_code=False)
    logps = stored_cache[1]

    pairs = tokenized["train"][5:15]
    scored = reference_cache.attach_reference_logps(tokenized["train"], logps["train"])[5:15]
    plain_batch = data.PreferenceCollator(pad_token_id=1)(pairs)
    cached_batch = reference_cache.ReferenceLogpsCollator(data.PreferenceCollator(1))(scored)

    plain_loss, plain_statistics = dpo.preference_step(policy, reference, loss_function, spec,
                                                       plain_batch)
    cached_loss, cached_statistics = dpo.preference_step(policy, None, loss_function, spec,
                                                         cached_batch)
    # The cached pass batched these pairs with other padding widths, so the float32 sums
    # of 18 to 40 token log-probs (magnitudes 100 to 230) differ in their last bits.
    # Rewards are beta times differences of such sums.
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_statistics["rewards/chosen"],
                               plain_statistics["rewards/chosen"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cached_statistics["rewards/rejected"],
                               plain_statistics["rewards/rejected"], rtol=1e-5, atol=1e-4)


def compose_dpo(checkpoint: Path, outputs_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="dpo", overrides=[
            f"model.name={checkpoint}", f"outputs_dir={outputs_dir}", "wandb.enabled=false",
            "dataset.num_pairs=80", "dataset.max_length=64", "dataset.max_prompt_length=32",
            "training.batch_size=16", "training.eval_batch_size=16", "training.max_steps=3",
            "training.warmup_steps=0", "training.eval_every=null", *overrides,
        ])


def train_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if record["split"] == "train"]


@pytest.mark.slow
def test_training_losses_equal_with_cache(tmp_path, checkpoint, caplog):
    runs = {}
    for precompute in (False, True, True):
        # IPO averages log-probs over tokens, so it also checks the stored token counts.
        config = compose_dpo(checkpoint, tmp_path / "outputs", "dpo.loss_type=ipo",
                             f"dpo.precompute_ref_logps={precompute}")
        run_dir = tmp_path / f"run-{len(runs)}"
        run_dir.mkdir()
        with caplog.at_level(logging.INFO, logger="reference_cache"):
            dpo.train_dpo(config, run_dir)
        runs[len(runs)] = run_dir

    without_cache, miss, hit = (train_losses(runs[index]) for index in range(3))
    assert len(without_cache) == 3
    assert miss == pytest.approx(without_cache, rel=1e-5, abs=1e-6)
    assert hit == miss
    assert caplog.text.count("cache miss") == 1
    assert caplog.text.count("cache hit") == 1


def test_scored_pair_reports_length_for_grouping():
    pair = data.TokenizedPair([1, 2, 3], [4, 5], [6], None)
    scored = reference_cache.ScoredPair(pair, -1.0, -2.0)
    assert scored.length == 5
