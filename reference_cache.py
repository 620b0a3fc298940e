"""Reference log-probs computed once per sweep and stored on disk.

The frozen reference model gives every pair the same log-probs in every run
that starts from the same checkpoint and reads the same tokens. dpo.py
therefore scores all train and eval pairs in one batched no-grad pass, stores
the summed log-probs and token counts in `<cache dir>/<key>.safetensors`, and
later runs with the same key load that file without loading the reference.

The key is a SHA-256 over everything that determines the numbers:

- the SHA-256 of the contents of the checkpoint's `config.json` and weight
  files (`*.safetensors`, else `*.bin`), hashed once per file and process;
- the token ids of every train and eval pair, which cover the dataset
  contents, the tokenizer and the length limits;
- `model.dtype`, `training.mixed_precision`, and the torch and transformers
  versions, which change the arithmetic.

Summed log-probs and token counts are stored, so losses that average over
response tokens (IPO) derive their averages from the same file. A file whose
checksum, key, shapes or token counts do not match is logged and rebuilt.
"""

import array
import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from filelock import FileLock
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

import data
import models

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # bump when the file layout or the key's inputs change
HASH_CHUNK_BYTES = 16 * 1024 * 1024
SPLITS = ("train", "eval")
FIELDS = ("chosen_logps", "rejected_logps", "chosen_token_counts", "rejected_token_counts")

# Weight-file digests computed by this process, by (path, size, mtime in ns),
# so the runs of one Hydra multirun hash a checkpoint once.
_file_digests: dict[tuple[str, int, int], str] = {}


class CorruptCacheError(ValueError):
    """Raised for a cache file that is unreadable or does not match its key and pairs."""


@dataclass(frozen=True)
class ReferenceLogps:
    """Reference log-probs of a list of pairs, each tensor of shape (pairs,).

    Log-probs are float32 sums over response tokens; token counts are int64.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_token_counts: torch.Tensor
    rejected_token_counts: torch.Tensor


@dataclass(frozen=True)
class ScoredPair:
    """A tokenized pair with its reference log-probs (summed over response tokens)."""

    pair: data.TokenizedPair
    reference_chosen_logp: float
    reference_rejected_logp: float

    @property
    def length(self) -> int:
        """Tokens in the longer sequence of the pair, for length-grouped batching."""
        return self.pair.length


class ReferenceLogpsCollator:
    """Batch scored pairs like `base`, adding `reference_logps` of shape (2B,).

    The tensor follows the base collator's row order: B chosen, then B rejected.
    """

    def __init__(self, base: Callable[[list[data.TokenizedPair]], dict[str, torch.Tensor]]):
        self.base = base

    def __call__(self, scored_pairs: list[ScoredPair]) -> dict[str, torch.Tensor]:
        batch = self.base([scored.pair for scored in scored_pairs])
        chosen = [scored.reference_chosen_logp for scored in scored_pairs]
        rejected = [scored.reference_rejected_logp for scored in scored_pairs]
        batch["reference_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
        return batch


# ---------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------


def resolve_checkpoint_dir(checkpoint: str) -> Path:
    """Return the local directory of a checkpoint path or hub id.

    A hub id resolves to its snapshot in the Hugging Face cache. Missing weights
    are downloaded first, which costs nothing extra because the policy loads them too.
    """
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.bin", "*.json"]
    return Path(snapshot_download(checkpoint, allow_patterns=patterns))


def weight_files(checkpoint_dir: Path) -> list[Path]:
    """List the files whose contents determine the model: config and weights."""
    weights = sorted(checkpoint_dir.glob("*.safetensors")) or sorted(checkpoint_dir.glob("*.bin"))
    config = checkpoint_dir / "config.json"
    if not weights or not config.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is missing config.json or *.safetensors / *.bin weights. Set "
            "model.name to a complete checkpoint, or set dpo.precompute_ref_logps=false"
        )
    return [config, *weights]


def file_digest(path: Path) -> str:
    """SHA-256 of a file's contents, memoised per process by path, size and mtime."""
    status = path.stat()
    memo_key = (str(path.resolve()), status.st_size, status.st_mtime_ns)
    if memo_key not in _file_digests:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        _file_digests[memo_key] = digest.hexdigest()
    return _file_digests[memo_key]


def checkpoint_digest(checkpoint: str) -> str:
    """SHA-256 over the names and content digests of a checkpoint's config and weights."""
    started = time.perf_counter()
    files = weight_files(resolve_checkpoint_dir(checkpoint))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{file_digest(path)}\n".encode())
    log.debug("Hashed %d checkpoint files in %.1f s", len(files), time.perf_counter() - started)
    return digest.hexdigest()


def token_digest(pairs: Sequence[data.TokenizedPair]) -> str:
    """SHA-256 over the prompt, chosen and rejected token ids of every pair, in order."""
    digest = hashlib.sha256()
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            digest.update(len(ids).to_bytes(8, "little"))
            digest.update(array.array("q", ids).tobytes())
    return digest.hexdigest()


def cache_key(checkpoint: str, train_set: Sequence[data.TokenizedPair],
              eval_set: Sequence[data.TokenizedPair], dtype: str, mixed_precision: str) -> str:
    """Hash everything that determines the reference log-probs into a hex key."""
    inputs = {
        "format": FORMAT_VERSION,
        "checkpoint": checkpoint_digest(checkpoint),
        "train_tokens": token_digest(train_set),
        "eval_tokens": token_digest(eval_set),
        "dtype": dtype,
        "mixed_precision": mixed_precision,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_cache(path: Path, key: str, logps: dict[str, ReferenceLogps]) -> None:
    """Write the log-probs of each split to `path` atomically, with key and checksum.

    The file is written beside `path` under a temporary name, flushed to disk
    and renamed over `path`, so a reader sees either no file or a whole one.
    """
    tensors = {f"{split}/{field}": getattr(logps[split], field).contiguous().cpu()
               for split in SPLITS for field in FIELDS}
    metadata = {"format": FORMAT_VERSION, "key": key, "checksum": tensors_checksum(tensors)}

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, staging, metadata=metadata)
        with staging.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def expected_token_counts(pairs: Sequence[data.TokenizedPair], response: str) -> torch.Tensor:
    """Count the response tokens that `models.sequence_logps` scores for each pair.

    The first token of a sequence has no preceding logit, so with an empty
    prompt the response's first token is not scored.
    """
    counts = [len(getattr(pair, f"{response}_ids")) - (not pair.prompt_ids) for pair in pairs]
    return torch.tensor(counts, dtype=torch.int64)


def load_cache(path: Path, key: str,
               pairs: dict[str, Sequence[data.TokenizedPair]]) -> dict[str, ReferenceLogps]:
    """Read a cache file and verify it against its key and the pairs.

    Raises CorruptCacheError when the file is unreadable, or when its format,
    key, tensor names, checksum, shapes or token counts do not match.
    """
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCacheError(f"unreadable safetensors file ({error})") from error

    if metadata.get("format") != FORMAT_VERSION or metadata.get("key") != key:
        raise CorruptCacheError(
            f"stored format {metadata.get('format')!r} and key {metadata.get('key')!r} "
            f"do not match format {FORMAT_VERSION!r} and key {key!r}"
        )
    expected_names = {f"{split}/{field}" for split in SPLITS for field in FIELDS}
    if set(tensors) != expected_names:
        raise CorruptCacheError(
            f"contains tensors {sorted(tensors)}, expected {sorted(expected_names)}"
        )
    if tensors_checksum(tensors) != metadata.get("checksum"):
        raise CorruptCacheError("checksum mismatch: the stored values were altered")

    logps = {}
    for split in SPLITS:
        values = ReferenceLogps(*(tensors[f"{split}/{field}"] for field in FIELDS))
        for field in FIELDS:
            shape = tuple(getattr(values, field).shape)
            if shape != (len(pairs[split]),):
                raise CorruptCacheError(
                    f"{split}/{field} has shape {shape}, expected ({len(pairs[split])},)"
                )
        for response in ("chosen", "rejected"):
            stored = getattr(values, f"{response}_token_counts")
            if not torch.equal(stored, expected_token_counts(pairs[split], response)):
                raise CorruptCacheError(
                    f"{split} {response} token counts differ from the tokenized pairs"
                )
        logps[split] = values
    return logps


# ---------------------------------------------------------------------------
# Computing and attaching
# ---------------------------------------------------------------------------


def compute_reference_logps(reference, pairs: Sequence[data.TokenizedPair], pad_token_id: int,
                            batch_size: int, accelerator: Accelerator,
                            description: str) -> ReferenceLogps:
    """Score every pair under the reference in batches of `batch_size`, without gradients.

    Pairs are batched in order of length to cut padding, and the results are
    put back in the original order. Runs under the accelerator's autocast, as
    the reference forward pass in training would.
    """
    order = sorted(range(len(pairs)), key=lambda index: len(pairs[index].prompt_ids)
                   + max(len(pairs[index].chosen_ids), len(pairs[index].rejected_ids)))
    collator = data.PreferenceCollator(pad_token_id)
    chosen_logps = torch.empty(len(pairs), dtype=torch.float32)
    rejected_logps = torch.empty(len(pairs), dtype=torch.float32)
    chosen_counts = torch.empty(len(pairs), dtype=torch.int64)
    rejected_counts = torch.empty(len(pairs), dtype=torch.int64)

    starts = range(0, len(order), batch_size)
    with torch.no_grad(), accelerator.autocast():
        for start in tqdm(starts, desc=description, mininterval=0.5, leave=False):
            indices = order[start:start + batch_size]
            batch = collator([pairs[index] for index in indices])
            batch = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
            logps, counts = models.sequence_logps(reference, batch)
            logps, counts = logps.float().cpu(), counts.cpu()
            size = len(indices)
            chosen_logps[indices], rejected_logps[indices] = logps[:size], logps[size:]
            chosen_counts[indices], rejected_counts[indices] = counts[:size], counts[size:]
    return ReferenceLogps(chosen_logps, rejected_logps, chosen_counts, rejected_counts)


def attach_reference_logps(pairs: Sequence[data.TokenizedPair],
                           logps: ReferenceLogps) -> list[ScoredPair]:
    """Pair each tokenized pair with its reference log-probs, for `ReferenceLogpsCollator`."""
    chosen, rejected = logps.chosen_logps.tolist(), logps.rejected_logps.tolist()
    return [ScoredPair(pair, chosen_logp, rejected_logp)
            for pair, chosen_logp, rejected_logp in zip(pairs, chosen, rejected, strict=True)]


def release_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the device after a model is dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cached_reference_logps(
    *,
    cache_dir: Path,
    key: str,
    pairs: dict[str, Sequence[data.TokenizedPair]],
    load_reference: Callable[[], torch.nn.Module],
    pad_token_id: int,
    batch_size: int,
    accelerator: Accelerator,
) -> dict[str, ReferenceLogps]:
    """Load the reference log-probs of the train and eval pairs, or compute and store them.

    On a hit the reference model is never loaded. On a miss, or when the file
    is corrupt, the main process loads the reference with `load_reference`,
    scores every pair, writes the file and frees the model. The other
    processes wait for it and then read the file. A lock file beside the cache
    file makes concurrent runs with the same key, such as the jobs of a SLURM
    sweep, wait for the first one's pass instead of repeating it.
    """
    path = cache_dir / f"{key}.safetensors"
    logps = None
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # NOTE: filelock takes an flock(2) lock, which some network file systems do not honour.
        # Concurrent runs then compute the same file, which stays correct but costs time.
        with FileLock(path.with_name(f"{path.name}.lock")):
            logps = _load_or_report(path, key, pairs)
            if logps is None:
                logps = _compute_and_save(path, key, pairs, load_reference, pad_token_id,
                                          batch_size, accelerator)
    # NOTE: on a miss only the main process scores the pairs while the others wait here.
    # A reference pass longer than the process group's timeout (30 min by default) fails.
    accelerator.wait_for_everyone()
    if logps is None:
        logps = load_cache(path, key, pairs)
    return logps


def _load_or_report(path: Path, key: str, pairs: dict[str, Sequence[data.TokenizedPair]]
                    ) -> dict[str, ReferenceLogps] | None:
    if not path.is_file():
        log.info("Reference log-probs: cache miss (no %s)", path)
        return None
    try:
        logps = load_cache(path, key, pairs)
    except CorruptCacheError as error:
        log.warning("Reference log-probs: cache file %s is invalid (%s), recomputing it",
                    path, error)
        return None
    log.info("Reference log-probs: cache hit, loaded %d train and %d eval pairs from %s "
             "without loading the reference model", len(pairs["train"]), len(pairs["eval"]), path)
    return logps


def _compute_and_save(path, key, pairs, load_reference, pad_token_id, batch_size,
                      accelerator) -> dict[str, ReferenceLogps]:
    started = time.perf_counter()
    reference = load_reference().to(accelerator.device)
    logps = {split: compute_reference_logps(reference, pairs[split], pad_token_id, batch_size,
                                            accelerator, f"reference {split}")
             for split in SPLITS}
    del reference
    release_memory()
    save_cache(path, key, logps)
    log.info("Reference log-probs: computed %d train and %d eval pairs in %.1f s, saved to %s",
             len(pairs["train"]), len(pairs["eval"]), time.perf_counter() - started, path)
    return logps
