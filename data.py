"""Preference data: loading, HH-RLHF parsing, the built-in synthetic set, tokenization.

Every source ends up as a list of `PreferencePair`: a prompt shared by both
responses, the chosen and rejected responses, and optional scalar rewards.
Three sources are supported, selected by the `dataset` config group:

- a Hugging Face hub dataset (`dataset.name`, optional `dataset.data_dir`);
- local files (`dataset.path`): `.jsonl`, `.jsonl.gz`, `.json`, `.parquet`,
  or a directory of `train.*` / `test.*` files laid out like the HH-RLHF release;
- the built-in synthetic set (`dataset.synthetic=true`), whose responses carry
  known rewards.
"""

import gzip
import hashlib
import json
import logging
import math
import os
import pickle
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"
FILE_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet")
IGNORE_INDEX = -100  # label value that cross-entropy and log-prob sums skip


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred response."""

    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float | None = None
    rejected_reward: float | None = None


@dataclass
class PreferenceSplits:
    """Train and held-out pairs, and whether every pair carries rewards."""

    train: list[PreferencePair]
    eval: list[PreferencePair]

    @property
    def has_rewards(self) -> bool:
        pairs = self.train + self.eval
        return bool(pairs) and all(pair.chosen_reward is not None for pair in pairs)


class DataError(ValueError):
    """Raised for input data that cannot be used, with the location and the fix."""


# ---------------------------------------------------------------------------
# Parsing rows into pairs
# ---------------------------------------------------------------------------


def split_hh_dialogue(dialogue: str) -> tuple[str, str] | None:
    """Split an HH-RLHF dialogue into (prompt, final assistant response).

    The prompt is everything up to and including the last "\\n\\nAssistant:",
    so it keeps every earlier turn. Returns None when the marker is missing.
    """
    cut = dialogue.rfind(ASSISTANT_MARKER)
    if cut < 0:
        return None
    cut += len(ASSISTANT_MARKER)
    return dialogue[:cut], dialogue[cut:]


def _read_reward(row: dict, key: str, where: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    try:
        reward = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {key}={value!r} is not a number") from None
    if reward != reward or reward in (float("inf"), float("-inf")):
        raise DataError(f"{where}: {key}={value!r} is not finite; drop or fix this row")
    return reward


def row_to_pair(row: dict, where: str) -> tuple[PreferencePair | None, str | None]:
    """Convert one raw row into a pair, or return (None, reason) for a row to drop.

    Accepts explicit rows (`prompt`, `chosen`, `rejected`) and raw HH-RLHF rows
    whose `chosen` and `rejected` are full dialogues. Optional `chosen_reward`
    and `rejected_reward` are carried over. Rows of the wrong shape raise
    DataError naming `where`.
    """
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(
                f"{where}: missing column {key!r} (found {sorted(row)}). Each row needs "
                "'chosen' and 'rejected', plus 'prompt' unless they are full HH dialogues."
            )
        if not isinstance(row[key], str):
            raise DataError(
                f"{where}: column {key!r} is {type(row[key]).__name__}, expected a string"
            )

    chosen_reward = _read_reward(row, "chosen_reward", where)
    rejected_reward = _read_reward(row, "rejected_reward", where)
    if (chosen_reward is None) != (rejected_reward is None):
        raise DataError(f"{where}: has only one of chosen_reward and rejected_reward")

    if row.get("prompt") is not None:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        chosen_split = split_hh_dialogue(row["chosen"])
        rejected_split = split_hh_dialogue(row["rejected"])
        if chosen_split is None or rejected_split is None:
            return None, "missing_assistant_marker"
        prompt, chosen = chosen_split
        rejected_prompt, rejected = rejected_split
        if prompt != rejected_prompt:
            return None, "prompt_mismatch"

    if not chosen.strip() or not rejected.strip():
        return None, "empty_response"
    if chosen == rejected:
        return None, "identical_responses"
    return PreferencePair(prompt, chosen, rejected, chosen_reward, rejected_reward), None


def rows_to_pairs(rows: Iterable[tuple[dict, str]], source: str) -> list[PreferencePair]:
    """Convert (row, location) items into pairs, logging how many were dropped and why."""
    pairs = []
    dropped: Counter[str] = Counter()
    for row, where in rows:
        pair, reason = row_to_pair(row, where)
        if pair is None:
            dropped[reason] += 1
        else:
            pairs.append(pair)

    if dropped:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(dropped.items()))
        log.info("%s: kept %d pairs, dropped %d (%s)", source, len(pairs), dropped.total(), reasons)
    else:
        log.info("%s: kept %d pairs, dropped none", source, len(pairs))

    rewarded = sum(pair.chosen_reward is not None for pair in pairs)
    if 0 < rewarded < len(pairs):
        raise DataError(
            f"{source}: {rewarded} of {len(pairs)} pairs have rewards and the rest do not; "
            "give every row chosen_reward and rejected_reward, or none"
        )
    return pairs


# ---------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------


def _read_json_lines(path: Path) -> Iterator[tuple[dict, str]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{where}: malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield row, where


def _read_json_document(path: Path) -> Iterator[tuple[dict, str]]:
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON lines named .json
            yield from _read_json_lines(path)
            return
        raise DataError(
            f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})"
        ) from None
    if isinstance(document, dict) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON lines")
    for index, row in enumerate(document):
        where = f"{path}[{index}]"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield row, where


def _read_parquet(path: Path) -> Iterator[tuple[dict, str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for index, row in enumerate(table.to_pylist()):
        yield row, f"{path}[row {index}]"


def read_rows(path: Path) -> Iterator[tuple[dict, str]]:
    """Yield (row, location) from one data file; the location names file and line."""
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(path)
    if name.endswith(".json"):
        return _read_json_document(path)
    if name.endswith(".parquet"):
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")


def _split_files(directory: Path, split: str) -> list[Path]:
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.name.startswith(split) and path.name.endswith(FILE_SUFFIXES)
    )


def load_local_pairs(path: Path) -> tuple[list[PreferencePair], list[PreferencePair] | None]:
    """Load pairs from a file or a directory; return (train, test or None).

    A directory is read like the HH-RLHF release: files named `train*` and
    `test*` with a supported suffix. When it contains only one of the two, that
    split is the whole source and a held-out split is carved from it later.
    """
    if not path.exists():
        raise DataError(f"dataset.path={str(path)!r} does not exist")
    if path.is_file():
        return rows_to_pairs(read_rows(path), str(path)), None

    train_files = _split_files(path, "train")
    test_files = _split_files(path, "test")
    if not train_files and not test_files:
        raise DataError(
            f"dataset.path={str(path)!r} contains no train.* or test.* files with a suffix in "
            f"{', '.join(FILE_SUFFIXES)}"
        )

    def read_split(files: list[Path]) -> list[PreferencePair]:
        rows = (item for file in files for item in read_rows(file))
        return rows_to_pairs(rows, ", ".join(str(file) for file in files))

    if train_files and test_files:
        return read_split(train_files), read_split(test_files)

    only_files = train_files or test_files
    log.warning(
        "%s has no %s file; using %s as the only source and holding out dataset.eval_fraction "
        "of it for evaluation",
        path,
        "test" if train_files else "train",
        ", ".join(file.name for file in only_files),
    )
    return read_split(only_files), None


def load_hub_pairs(
    name: str, data_dir: str | None, train_split: str, eval_split: str
) -> tuple[list[PreferencePair], list[PreferencePair] | None]:
    """Load pairs from a Hugging Face hub dataset; return (train, eval or None)."""
    import datasets

    dataset = datasets.load_dataset(name, data_dir=data_dir)
    if train_split not in dataset:
        raise DataError(
            f"dataset.name={name!r} has no split {train_split!r} (splits: {list(dataset)}); "
            "set dataset.train_split"
        )

    def convert(split: str) -> list[PreferencePair]:
        rows = ((row, f"{name}[{split}][{index}]") for index, row in enumerate(dataset[split]))
        return rows_to_pairs(rows, f"{name}:{split}")

    eval_pairs = convert(eval_split) if eval_split in dataset else None
    return convert(train_split), eval_pairs


# ---------------------------------------------------------------------------
# The built-in synthetic set
# ---------------------------------------------------------------------------

SYNTHETIC_TOPICS = {
    "fruits": ["apple", "banana", "cherry", "mango", "peach", "plum", "grape", "lemon"],
    "animals": ["horse", "tiger", "otter", "eagle", "whale", "zebra", "camel", "panda"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "silver", "brown"],
    "tools": ["hammer", "wrench", "saw", "drill", "chisel", "pliers", "shovel", "ladder"],
    "instruments": ["piano", "violin", "flute", "drum", "cello", "guitar", "trumpet", "harp"],
    "sports": ["tennis", "soccer", "rugby", "hockey", "golf", "boxing", "rowing", "karate"],
}
SYNTHETIC_REQUESTS = [
    "Can you name some {topic}?",
    "Please list a few {topic}.",
    "What are some {topic} you know?",
    "Tell me some {topic}, please.",
]
SYNTHETIC_OPENERS = {  # opener text -> tone score
    "Sure, happy to help!": 1.0,
    "Of course, here you go:": 1.0,
    "Here are some:": 0.0,
    "Okay:": 0.0,
    "Ugh, fine:": -1.0,
    "Whatever, take these:": -1.0,
}
SYNTHETIC_GREETING = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help you today?"


def synthetic_reward(on_topic: int, off_topic: int, tone: float) -> float:
    """Score a synthetic response: +1 per on-topic item, -1 per off-topic item, plus tone.

    Tone is +1 for a polite opener, 0 for a neutral one and -1 for a rude one,
    so rewards range from -6 (five wrong items, rude) to +6.
    """
    return float(on_topic - off_topic) + tone


def _synthetic_response(rng: random.Random, topic: str) -> tuple[str, float]:
    opener = rng.choice(list(SYNTHETIC_OPENERS))
    item_count = rng.randint(2, 5)
    on_topic_probability = rng.random()
    items, on_topic = [], 0
    for _ in range(item_count):
        if rng.random() < on_topic_probability:
            items.append(rng.choice(SYNTHETIC_TOPICS[topic]))
            on_topic += 1
        else:
            other_topic = rng.choice([name for name in SYNTHETIC_TOPICS if name != topic])
            items.append(rng.choice(SYNTHETIC_TOPICS[other_topic]))
    text = f" {opener} {', '.join(items)}."
    reward = synthetic_reward(on_topic, item_count - on_topic, SYNTHETIC_OPENERS[opener])
    return text, reward


def build_synthetic_pairs(num_pairs: int, seed: int) -> list[PreferencePair]:
    """Generate HH-format pairs whose responses have known rewards.

    Each prompt requests examples of one topic, sometimes after a greeting
    turn. Each response is an opener followed by two to five items, each from
    the requested topic or another one, scored by `synthetic_reward`. Of two
    responses with different rewards, the higher-scored one is chosen. The
    same (num_pairs, seed) always gives the same pairs.
    """
    rng = random.Random(seed)
    topics = list(SYNTHETIC_TOPICS)
    pairs = []
    while len(pairs) < num_pairs:
        topic = rng.choice(topics)
        request = rng.choice(SYNTHETIC_REQUESTS).format(topic=topic)
        greeting = SYNTHETIC_GREETING if rng.random() < 0.3 else ""
        prompt = f"{greeting}{HUMAN_MARKER} {request}{ASSISTANT_MARKER}"

        first, first_reward = _synthetic_response(rng, topic)
        second, second_reward = _synthetic_response(rng, topic)
        if first_reward == second_reward:
            continue
        if first_reward < second_reward:
            first, second = second, first
            first_reward, second_reward = second_reward, first_reward
        pairs.append(PreferencePair(prompt, first, second, first_reward, second_reward))
    return pairs


# ---------------------------------------------------------------------------
# Splits and size limits
# ---------------------------------------------------------------------------


def _seeded_subset(pairs: list[PreferencePair], limit: int | None, seed: int):
    if limit is None or limit >= len(pairs):
        return pairs
    indices = sorted(random.Random(seed).sample(range(len(pairs)), limit))
    return [pairs[index] for index in indices]


def hold_out(
    pairs: list[PreferencePair], eval_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into (train, eval) with a seeded shuffle; eval has >= 1 pair."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    eval_count = max(1, round(len(pairs) * eval_fraction))
    eval_indices = set(order[:eval_count])
    train = [pair for index, pair in enumerate(pairs) if index not in eval_indices]
    held_out = [pair for index, pair in enumerate(pairs) if index in eval_indices]
    return train, held_out


def load_preference_data(config, seed: int) -> PreferenceSplits:
    """Load the source that the `dataset` config selects and return train/eval pairs.

    Raises DataError when the source is missing, malformed, or leaves no pairs.
    """
    if not 0.0 < config.eval_fraction < 1.0:
        raise DataError(
            f"dataset.eval_fraction={config.eval_fraction} must be in (0, 1), e.g. 0.05"
        )
    reward_scale = validate_reward_scale(config.get("reward_scale", 1.0))

    if config.get("synthetic"):
        train, held_out = build_synthetic_pairs(config.num_pairs, config.seed), None
        source = f"synthetic set ({config.num_pairs} pairs, seed {config.seed})"
    elif config.get("path"):
        train, held_out = load_local_pairs(Path(config.path).expanduser())
        source = str(config.path)
    elif config.get("name"):
        train, held_out = load_hub_pairs(
            config.name, config.get("data_dir"), config.train_split, config.eval_split
        )
        source = config.name
    else:
        raise DataError(
            "No dataset selected: set dataset.path (local files), dataset.name (hub id), "
            "or use dataset=synthetic"
        )

    if held_out is None:
        train, held_out = hold_out(train, config.eval_fraction, seed)
        log.info("Held out %d of the pairs from %s for evaluation (seed %d)",
                 len(held_out), source, seed)

    train = _seeded_subset(train, config.get("train_size_limit"), seed)
    held_out = _seeded_subset(held_out, config.get("eval_size_limit"), seed + 1)
    if not train:
        raise DataError(f"{source}: no usable training pairs are left after filtering")
    if not held_out:
        raise DataError(f"{source}: no usable evaluation pairs are left after filtering")
    log.info("Using %d train and %d eval pairs from %s", len(train), len(held_out), source)
    splits = PreferenceSplits(train, held_out)
    return scale_rewards(splits, reward_scale) if reward_scale != 1.0 else splits


def validate_reward_scale(reward_scale) -> float:
    """Return `dataset.reward_scale` as a float, raising DataError unless it is finite and > 0.

    A negative scale would reverse every preference, and zero would erase them.
    """
    try:
        scale = float(reward_scale)
    except (TypeError, ValueError):
        raise DataError(f"dataset.reward_scale={reward_scale!r} is not a number") from None
    if not math.isfinite(scale) or scale <= 0:
        raise DataError(
            f"dataset.reward_scale={reward_scale!r} must be a finite positive number, "
            "e.g. 1.0 to use the rewards as stored"
        )
    return scale


def scale_rewards(splits: PreferenceSplits, reward_scale: float) -> PreferenceSplits:
    """Return the splits with every reward multiplied by `reward_scale`; files are not changed."""
    if not splits.has_rewards:
        log.warning("dataset.reward_scale=%g has no effect: the pairs carry no rewards",
                    reward_scale)
        return splits

    def scale(pairs: list[PreferencePair]) -> list[PreferencePair]:
        return [
            replace(pair, chosen_reward=pair.chosen_reward * reward_scale,
                    rejected_reward=pair.rejected_reward * reward_scale)
            for pair in pairs
        ]

    log.info("Scaled every reward by dataset.reward_scale=%g", reward_scale)
    return PreferenceSplits(scale(splits.train), scale(splits.eval))


# ---------------------------------------------------------------------------
# Tokenization and batching
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of a pair: one prompt shared by two responses that end with EOS."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    reward_difference: float | None

    @property
    def length(self) -> int:
        """Tokens in the longer of the two sequences, which sets the pair's padded width."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int,
             max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Keep the last max_prompt_length prompt tokens, then cut the response to fit max_length."""
    prompt_ids = prompt_ids[-max_prompt_length:]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return prompt_ids, response_ids


def tokenize_pair(pair: PreferencePair, tokenizer, max_length: int,
                  max_prompt_length: int) -> TokenizedPair:
    """Tokenize prompt and responses separately, so both sequences share the prompt ids.

    EOS is appended to each response before truncation: a response cut by
    max_length loses its EOS, as it would in any fixed-length model input.
    """
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    chosen_ids = tokenizer(pair.chosen, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(pair.rejected, add_special_tokens=False)["input_ids"]
    chosen_ids = chosen_ids + [tokenizer.eos_token_id]
    rejected_ids = rejected_ids + [tokenizer.eos_token_id]

    prompt_for_chosen, chosen_ids = truncate(prompt_ids, chosen_ids, max_length, max_prompt_length)
    _, rejected_ids = truncate(prompt_ids, rejected_ids, max_length, max_prompt_length)
    reward_difference = None
    if pair.chosen_reward is not None:
        reward_difference = pair.chosen_reward - pair.rejected_reward
    return TokenizedPair(prompt_for_chosen, chosen_ids, rejected_ids, reward_difference)


def check_length_limits(max_length: int, max_prompt_length: int) -> None:
    """Raise DataError unless at least one response token fits after the longest prompt."""
    if max_prompt_length >= max_length:
        raise DataError(
            f"dataset.max_prompt_length={max_prompt_length} must be smaller than "
            f"dataset.max_length={max_length}, or no response token fits"
        )


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_length: int,
                   max_prompt_length: int) -> list[TokenizedPair]:
    """Tokenize every pair; see `tokenize_pair`."""
    check_length_limits(max_length, max_prompt_length)
    return [tokenize_pair(pair, tokenizer, max_length, max_prompt_length) for pair in pairs]


TOKENIZED_CACHE_VERSION = 1  # bump when TokenizedPair or tokenize_pair changes


def tokenized_cache_key(pairs: Sequence[PreferencePair], tokenizer, max_length: int,
                        max_prompt_length: int) -> str | None:
    """Hash the pairs' text and rewards, the tokenizer and the length limits.

    Returns None for a tokenizer without a serialisable fast backend, whose
    output cannot be fingerprinted; such data is tokenized every run.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256()
    header = [TOKENIZED_CACHE_VERSION, max_length, max_prompt_length, tokenizer.eos_token_id]
    digest.update(json.dumps(header).encode())
    digest.update(backend.to_str().encode())
    for pair in pairs:
        fields = [pair.prompt, pair.chosen, pair.rejected, pair.chosen_reward, pair.rejected_reward]
        digest.update(json.dumps(fields).encode())
    return digest.hexdigest()


def _read_tokenized_cache(path: Path) -> list[TokenizedPair] | None:
    """Load a cache file, or return None (with a warning) when it is unreadable."""
    try:
        rows = torch.load(path, weights_only=True)
        return [TokenizedPair(*row) for row in rows]
    except (OSError, RuntimeError, EOFError, TypeError, ValueError,
            pickle.UnpicklingError) as error:
        log.warning("Tokenized cache %s is unreadable (%s); tokenizing again and replacing it",
                    path, error)
        return None


def _write_tokenized_cache(path: Path, tokenized: list[TokenizedPair]) -> None:
    """Write the cache under a temporary name and rename it, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, pair.reward_difference)
            for pair in tokenized]
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(rows, partial)
    os.replace(partial, path)


def tokenize_pairs_cached(pairs: Sequence[PreferencePair], tokenizer, max_length: int,
                          max_prompt_length: int, cache_dir: Path | None) -> list[TokenizedPair]:
    """Tokenize like `tokenize_pairs`, reusing the result of an earlier run from `cache_dir`.

    The cache file is named by `tokenized_cache_key`, so changed data, another
    tokenizer or other length limits never hit a stale file. An unreadable
    file is rebuilt. `cache_dir` None turns caching off.
    """
    key = None
    if cache_dir is not None:
        key = tokenized_cache_key(pairs, tokenizer, max_length, max_prompt_length)
    if key is None:
        return tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length)

    path = Path(cache_dir) / f"tokenized-{key}.pt"
    if path.is_file():
        tokenized = _read_tokenized_cache(path)
        if tokenized is not None and len(tokenized) == len(pairs):
            log.info("Loaded %d tokenized pairs from %s", len(tokenized), path)
            return tokenized

    tokenized = tokenize_pairs(pairs, tokenizer, max_length, max_prompt_length)
    _write_tokenized_cache(path, tokenized)
    log.info("Tokenized %d pairs and cached them in %s", len(tokenized), path)
    return tokenized


def _pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_token_id: int):
    """Right-pad (prompt, response) id lists; labels keep only response tokens."""
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response)
        labels[row, len(prompt):length] = torch.tensor(response)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PreferenceCollator:
    """Batch pairs as one tensor of 2B sequences: B chosen rows, then B rejected rows.

    Putting both responses in one batch lets the policy score them in a single
    forward pass. `labels` hold IGNORE_INDEX on prompt and padding tokens.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        sequences = [(pair.prompt_ids, pair.chosen_ids) for pair in pairs]
        sequences += [(pair.prompt_ids, pair.rejected_ids) for pair in pairs]
        batch = _pad_sequences(sequences, self.pad_token_id)
        if pairs[0].reward_difference is not None:
            batch["reward_differences"] = torch.tensor(
                [pair.reward_difference for pair in pairs], dtype=torch.float32
            )
        return batch


class SFTCollator:
    """Batch the chosen sequence of each pair for supervised fine-tuning."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return _pad_sequences([(pair.prompt_ids, pair.chosen_ids) for pair in pairs],
                              self.pad_token_id)


def training_texts(pairs: Iterable[PreferencePair]) -> Iterator[str]:
    """Yield every prompt and response, for training a tokenizer."""
    for pair in pairs:
        yield pair.prompt
        yield pair.chosen
        yield pair.rejected


# ---------------------------------------------------------------------------
# Raw rows by split, for tools that rewrite a source
# ---------------------------------------------------------------------------


def read_source_rows(config) -> dict[str, list[tuple[dict, str]]]:
    """Read the raw rows of the source that the `dataset` config selects, by split.

    Returns {"train": rows} plus {"test": rows} when the source has a test
    split; each row is a (row dict, location) item as `read_rows` yields it,
    with every original column. A local directory maps its `train*` and
    `test*` files to those names, and a hub dataset maps `dataset.train_split`
    and `dataset.eval_split`. Unlike `load_preference_data`, nothing is held
    out, subsampled or dropped here.
    """
    if config.get("synthetic"):
        pairs = build_synthetic_pairs(config.num_pairs, config.seed)
        rows = [(asdict(pair), f"synthetic[{index}]") for index, pair in enumerate(pairs)]
        return {"train": rows}

    if config.get("path"):
        path = Path(config.path).expanduser()
        if not path.exists():
            raise DataError(f"dataset.path={str(path)!r} does not exist")
        if path.is_file():
            return {"train": list(read_rows(path))}
        splits = {
            split: [item for file in files for item in read_rows(file)]
            for split in ("train", "test")
            if (files := _split_files(path, split))
        }
        if not splits:
            raise DataError(
                f"dataset.path={str(path)!r} contains no train.* or test.* files with a suffix in "
                f"{', '.join(FILE_SUFFIXES)}"
            )
        return splits

    if config.get("name"):
        import datasets

        dataset = datasets.load_dataset(config.name, data_dir=config.get("data_dir"))
        if config.train_split not in dataset:
            raise DataError(
                f"dataset.name={config.name!r} has no split {config.train_split!r} "
                f"(splits: {list(dataset)}); set dataset.train_split"
            )
        splits = {}
        for split, hub_split in (("train", config.train_split), ("test", config.eval_split)):
            if hub_split in dataset:
                splits[split] = [(dict(row), f"{config.name}[{hub_split}][{index}]")
                                 for index, row in enumerate(dataset[hub_split])]
        return splits

    raise DataError(
        "No dataset selected: set dataset.path (local files), dataset.name (hub id), "
        "or use dataset=synthetic"
    )
