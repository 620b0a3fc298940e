"""Building and loading causal language models and their tokenizers.

Two kinds of model config exist under `configs/model/`:

- `tiny`: a GPT-NeoX (Pythia) network built from `model.architecture` with
  random weights, and a byte-level BPE tokenizer trained on the run's own
  texts; both are saved with the SFT checkpoint, so later stages load them
  like any other checkpoint.
- hub models (`pythia-*`): `model.name` and `model.tokenizer` are hub ids or
  local paths, loaded with `from_pretrained`.

Either can be trained whole or through LoRA adapters (`model.lora`), with
gradient checkpointing as an option.
"""

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map `model.dtype` to a torch dtype, raising ValueError for unknown names."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Pythia's special tokens on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def build_tiny_model(architecture, tokenizer, seed: int) -> GPTNeoXForCausalLM:
    """Build a randomly initialised GPT-NeoX model sized by `model.architecture`."""
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=architecture.hidden_size,
        num_hidden_layers=architecture.num_layers,
        num_attention_heads=architecture.num_heads,
        intermediate_size=4 * architecture.hidden_size,
        max_position_embeddings=architecture.max_position_embeddings,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config)
    return model


def check_local_source(name_or_path: str, what: str) -> None:
    """Reject an existing local directory that contains no Hugging Face files, before loading."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() \
            and not (path / "tokenizer_config.json").is_file():
        raise ValueError(
            f"{what}={name_or_path!r} is a directory without a Hugging Face checkpoint "
            "(no config.json). Point it at a checkpoint directory, such as an SFT run's "
            "model/ directory, or at a hub id."
        )


def hub_error(name_or_path: str, what: str, error: OSError) -> OSError:
    """Wrap a loading failure with what to check: the path, the hub id or the network."""
    return OSError(
        f"Could not load {what}={name_or_path!r}: {error}. Check the local path or hub id; "
        "without network access, download it first or set HF_HUB_OFFLINE=1 to use the "
        "local cache."
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool):
    """Load a tokenizer and give it a pad token (EOS) when it has none, as Pythia's lacks one."""
    check_local_source(name_or_path, "model.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path,
                                                  trust_remote_code=trust_remote_code)
    except OSError as error:
        raise hub_error(name_or_path, "model.tokenizer", error) from error
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"Tokenizer {name_or_path!r} has no EOS token; responses must end with one. "
            "Set model.tokenizer to a tokenizer that defines eos_token."
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str, trust_remote_code: bool):
    """Load a causal LM from the hub or a local checkpoint in `dtype`."""
    check_local_source(name_or_path, "model.name")
    try:
        return AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise hub_error(name_or_path, "model.name", error) from error


def is_checkpoint_dir(path: Path) -> bool:
    """Return whether `path` contains a complete Hugging Face model checkpoint."""
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and has_weights


def sft_checkpoints(outputs_dir: Path) -> list[Path]:
    """List the complete SFT models under `outputs_dir`, newest first.

    SFT runs write their final model to `<run>/model` with a `sft_config.yaml`
    beside the weights. Checkpoints are renamed into place only when complete,
    so a directory listed here is never half-written.
    """
    if not outputs_dir.is_dir():
        return []
    candidates = [
        marker.parent
        for marker in outputs_dir.rglob("model/sft_config.yaml")
        if is_checkpoint_dir(marker.parent)
    ]
    return sorted(candidates, key=lambda path: (path / "sft_config.yaml").stat().st_mtime,
                  reverse=True)


def sft_labels(checkpoint: Path) -> tuple[str | None, str | None]:
    """Return the (model.label, dataset.label) that an SFT checkpoint was trained with."""
    import yaml

    config = yaml.safe_load((checkpoint / "sft_config.yaml").read_text(encoding="utf-8")) or {}
    return (config.get("model") or {}).get("label"), (config.get("dataset") or {}).get("label")


def newest_sft_checkpoint(outputs_dir: Path, model_label: str | None = None,
                          dataset_label: str | None = None) -> Path | None:
    """Find the newest SFT model under `outputs_dir` trained with the given labels, or None.

    A label of None matches any checkpoint. Raises FileNotFoundError when SFT
    checkpoints exist but none matches, naming what was found.
    """
    checkpoints = sft_checkpoints(outputs_dir)
    if not checkpoints:
        return None
    for checkpoint in checkpoints:
        trained_model, trained_dataset = sft_labels(checkpoint)
        if model_label not in (None, trained_model):
            continue
        if dataset_label not in (None, trained_dataset):
            continue
        return checkpoint
    found = ", ".join(f"{checkpoint} (model={labels[0]}, dataset={labels[1]})"
                      for checkpoint in checkpoints[:5]
                      for labels in [sft_labels(checkpoint)])
    raise FileNotFoundError(
        f"No SFT checkpoint under {outputs_dir} was trained with model={model_label} and "
        f"dataset={dataset_label}; found: {found}. Run `python sft.py model={model_label} "
        f"dataset={dataset_label}` first, or set model.name to the checkpoint to start from."
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to zero, so policy and reference score alike."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the log-probs of each sequence's label tokens; return (sums, token counts).

    Labels equal to -100 (prompt and padding) are skipped. Logits are upcast to
    float32, and the label log-probs are taken as the gathered logit minus the
    log-sum-exp, so no second vocabulary-sized tensor of log-softmax is built.
    Both outputs have shape (batch,).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    label_logits = torch.gather(logits, -1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = (label_logits - torch.logsumexp(logits, dim=-1)) * mask
    return token_logps.sum(-1), mask.sum(-1)


# ---------------------------------------------------------------------------
# LoRA and gradient checkpointing
# ---------------------------------------------------------------------------


def validate_lora_config(lora) -> None:
    """Check `model.lora` before any model loads."""
    if not lora.enabled:
        return
    if lora.rank < 1:
        raise ValueError(f"model.lora.rank={lora.rank} must be a positive integer, e.g. 16")
    if not 0.0 <= lora.dropout < 1.0:
        raise ValueError(f"model.lora.dropout={lora.dropout} must be in [0, 1)")
    if not lora.target_modules:
        raise ValueError(
            "model.lora.target_modules is empty; list the module names to adapt, e.g. "
            "[query_key_value,dense,dense_h_to_4h,dense_4h_to_h] for Pythia"
        )


def add_lora_adapters(model, lora):
    """Wrap `model` in a peft model whose only trainable weights are LoRA adapters.

    Each adapted linear layer W gains a low-rank update (alpha / rank) * B A,
    with B initialised to zero, so the wrapped model starts out computing
    exactly what `model` computes.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    trainable = sum(parameter.numel() for parameter in model.parameters()
                    if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())
    log.info("LoRA rank %d on %s: %.2fM of %.2fM parameters trainable", lora.rank,
             ", ".join(lora.target_modules), trainable / 1e6, total / 1e6)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Uses the non-reentrant torch implementation, which also works when only
    LoRA adapters need gradients, and turns off the KV cache it cannot use.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def configure_training(model, lora, gradient_checkpointing: bool):
    """Apply gradient checkpointing and LoRA adapters as configured; return the model to train."""
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora.enabled:
        model = add_lora_adapters(model, lora)
    return model


class AdapterDisabledReference:
    """The frozen reference of a LoRA policy: the same network with its adapters off.

    Calling it runs `policy` (as prepared by accelerate) without gradients
    inside peft's `disable_adapter()` on `peft_model`, the unwrapped policy, so
    it scores with the base weights that policy and reference share, and no
    second copy of them is held.
    """

    def __init__(self, policy, peft_model):
        self.policy = policy
        self.peft_model = peft_model

    def __call__(self, **inputs):
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.policy(**inputs)

    def to(self, device):
        """Move the shared network to `device` and return this reference."""
        self.policy.to(device)
        return self
