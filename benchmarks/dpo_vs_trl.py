"""Throughput of dpo.py's preference training against TRL's DPOTrainer on the same work.

    uv run --group benchmark python benchmarks/dpo_vs_trl.py --repeats 3

Both implementations train the same tiny GPT-NeoX (configs/model/tiny.yaml
architecture, one set of initial weights) with the same BPE tokenizer on the
same pairs, batch size, maximum length, beta and sigmoid loss, for one epoch.
The pairs are HH-RLHF rows (`--data`, default ../shared/data/hh-rlhf/harmless-base
beside the repository) or, when that directory is missing, the synthetic set.
Only pairs that fit `--max-length` and `--max-prompt-length` untruncated, and
whose prompt tokens are a prefix of the prompt-plus-response tokens, are used,
because the two implementations truncate differently and TRL tokenizes prompt
and response together. So both see identical token ids.

Each run is a fresh subprocess, so its peak resident memory (ru_maxrss, which
includes imports and model loading) belongs to one implementation. Runs
alternate ours and TRL for `--repeats` rounds. Timing covers the training steps
only. For ours, it is the sum of the per-step times that `training.train_step`
logs to metrics.jsonl (fetch and collate the batch, forward, backward, clip,
optimiser step). For TRL, it is the time from the trainer's `on_train_begin`
to its `on_train_end` callback, so its per-step logging counts as well.

Before timing, the script checks that both compute the same summed log-probs
of the first batch's chosen and rejected sequences from the same weights and
token ids, and exits with status 1 when they differ.

Model FLOP utilisation counts 6 N FLOPs per token for the policy's forward and
backward pass plus 2 N for the reference forward pass, where N is the number
of parameters outside the input embedding. Attention score FLOPs are left out,
and only non-padding tokens count. The peak is the best of several float32
`torch.matmul` timings of 2048 x 2048 matrices on this machine.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "hh-rlhf" / "harmless-base"
IMPLEMENTATIONS = ("ours", "trl")
PRECOMPUTED = "ours (precomputed reference)"
EVAL_PAIRS = 8  # held-out pairs dpo.py evaluates before and after training, outside the timing
LOGPS_RELATIVE_TOLERANCE = 1e-5  # float32 sums of a few hundred token log-probs
LOGPS_ABSOLUTE_TOLERANCE = 1e-3


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="HH-RLHF directory or file; the synthetic set when it is missing")
    parser.add_argument("--pairs", type=int, default=512, help="training pairs (one epoch)")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimiser step")
    parser.add_argument("--max-length", type=int, default=512, help="prompt plus response, tokens")
    parser.add_argument("--max-prompt-length", type=int, default=256, help="prompt tokens")
    parser.add_argument("--beta", type=float, default=0.1, help="sigmoid (DPO) loss beta")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW rate")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of runs")
    parser.add_argument("--seed", type=int, default=0, help="pair selection and model seed")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where model, data and runs go; a temporary directory by default")
    parser.add_argument("--child", choices=["check", *IMPLEMENTATIONS, "ours-precomputed"],
                        help=argparse.SUPPRESS)
    return parser.parse_args()


# ---------------------------------------------------------------------------
# Shared set-up: pairs, tokenizer, initial weights
# ---------------------------------------------------------------------------


def load_candidate_pairs(path: Path, seed: int):
    import data

    if path.exists():
        pairs, _ = data.load_local_pairs(path)
        return pairs, f"HH-RLHF rows from {path}"
    return data.build_synthetic_pairs(4000, seed), "the synthetic set (no HH-RLHF rows found)"


def fits_untruncated(pair, tokenizer, max_length: int, max_prompt_length: int) -> bool:
    """Tell whether both implementations would see this pair's tokens unchanged."""
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) > max_prompt_length:
        return False
    for response in (pair.chosen, pair.rejected):
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(response_ids) + 1 > max_length:  # + EOS
            return False
        joint_ids = tokenizer(pair.prompt + response, add_special_tokens=False)["input_ids"]
        if joint_ids != prompt_ids + response_ids:
            return False
    return True


def prepare(arguments: argparse.Namespace, work_dir: Path) -> dict:
    """Write the model, tokenizer and pair files that every run reads; return their facts."""
    from omegaconf import OmegaConf

    import data
    import models

    candidates, source = load_candidate_pairs(arguments.data, arguments.seed)
    architecture = OmegaConf.load(REPOSITORY / "configs" / "model" / "tiny.yaml")
    tokenizer = models.train_bpe_tokenizer(data.training_texts(candidates),
                                           architecture.vocab_size)
    random.Random(arguments.seed).shuffle(candidates)
    needed = arguments.pairs + EVAL_PAIRS
    selected = []
    for pair in candidates:
        if fits_untruncated(pair, tokenizer, arguments.max_length, arguments.max_prompt_length):
            selected.append(pair)
            if len(selected) == needed:
                break
    if len(selected) < needed:
        raise SystemExit(f"Only {len(selected)} of {len(candidates)} pairs fit --max-length="
                         f"{arguments.max_length} untruncated; {needed} are needed. Lower --pairs.")

    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": selected[:arguments.pairs], "test": selected[arguments.pairs:]}
    for split, pairs in splits.items():
        with (data_dir / f"{split}.jsonl").open("w", encoding="utf-8") as lines:
            for pair in pairs:
                row = {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
                lines.write(json.dumps(row) + "\n")

    model = models.build_tiny_model(architecture.architecture, tokenizer, arguments.seed)
    model.save_pretrained(work_dir / "model")
    tokenizer.save_pretrained(work_dir / "model")

    tokenized = data.tokenize_pairs(splits["train"], tokenizer, arguments.max_length,
                                    arguments.max_prompt_length)
    tokens = sum(2 * len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
                 for pair in tokenized)
    embedding = model.get_input_embeddings().weight.numel()
    parameters = sum(parameter.numel() for parameter in model.parameters()) - embedding
    return {"source": source, "candidates": len(candidates), "tokens": tokens,
            "parameters": parameters, "longest_pair": max(pair.length for pair in tokenized)}


# ---------------------------------------------------------------------------
# Ours: dpo.train_dpo with a composed config
# ---------------------------------------------------------------------------


def compose_ours(arguments: argparse.Namespace, work_dir: Path, precompute: bool = False):
    from hydra import compose, initialize_config_dir

    overrides = [
        f"model.name={work_dir / 'model'}",
        "dataset=hh_rlhf",
        f"dataset.path={work_dir / 'data'}",
        f"dataset.max_length={arguments.max_length}",
        f"dataset.max_prompt_length={arguments.max_prompt_length}",
        "loss=sigmoid",
        f"dpo.beta={arguments.beta}",
        f"training.seed={arguments.seed}",
        f"training.batch_size={arguments.batch_size}",
        f"training.max_steps={arguments.pairs // arguments.batch_size}",
        f"training.learning_rate={arguments.learning_rate}",
        f"training.eval_batch_size={EVAL_PAIRS}",
        "training.eval_every=null",
        "training.group_by_length=true",
        "wandb.enabled=false",
        f"outputs_dir={work_dir / 'runs'}",
        f"cache_dir={work_dir / 'cache'}",
    ]
    if precompute:
        overrides.append("dpo.precompute_ref_logps=true")
    with initialize_config_dir(config_dir=str(REPOSITORY / "configs"), version_base="1.3"):
        return compose("dpo", overrides=overrides)


def supports_precomputed_reference() -> bool:
    from omegaconf import OmegaConf

    config = OmegaConf.load(REPOSITORY / "configs" / "dpo.yaml")
    return "precompute_ref_logps" in config.get("dpo", {})


def run_ours(arguments: argparse.Namespace, work_dir: Path, precompute: bool) -> dict:
    import dpo

    run_dir = Path(tempfile.mkdtemp(prefix="ours-", dir=work_dir))
    config = compose_ours(arguments, work_dir, precompute)
    dpo.train_dpo(config, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if record["split"] == "train"]
    step_seconds = [arguments.batch_size / record["pairs_per_second"] for record in steps]
    logged_tokens = sum(record["tokens_per_second"] * seconds
                        for record, seconds in zip(steps, step_seconds, strict=True))
    return {"seconds": sum(step_seconds), "steps": len(steps), "logged_tokens": logged_tokens}


# ---------------------------------------------------------------------------
# TRL: DPOTrainer on the same files
# ---------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def build_trl_trainer(arguments: argparse.Namespace, work_dir: Path, rows: list[dict],
                      callbacks=(), max_steps: int | None = None):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model_dir = work_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = DPOConfig(
        output_dir=str(Path(tempfile.mkdtemp(prefix="trl-", dir=work_dir))),
        per_device_train_batch_size=arguments.batch_size,
        max_steps=max_steps or arguments.pairs // arguments.batch_size,
        learning_rate=arguments.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=10,  # the dpo.yaml default
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=arguments.beta,
        loss_type=["sigmoid"],
        max_length=arguments.max_length,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=arguments.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    return DPOTrainer(model=policy, ref_model=reference, args=config,
                      train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=list(callbacks))


def run_trl(arguments: argparse.Namespace, work_dir: Path) -> dict:
    from transformers import TrainerCallback

    class TrainingTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.started

    timer = TrainingTimer()
    trainer = build_trl_trainer(arguments, work_dir, read_rows(work_dir / "data" / "train.jsonl"),
                                callbacks=[timer])
    trainer.train()
    return {"seconds": timer.seconds, "steps": trainer.state.global_step}


# ---------------------------------------------------------------------------
# First-batch log-prob check
# ---------------------------------------------------------------------------


def ours_first_batch(arguments: argparse.Namespace, work_dir: Path, pairs):
    """Summed log-probs and token ids of `pairs` from dpo.py's preference step."""
    import functools

    import torch

    import data
    import dpo

    config = compose_ours(arguments, work_dir)
    spec = dpo.validate_dpo_config(config)
    tokenizer, policy = dpo.load_policy(config.model.name, config)
    reference = dpo.load_reference(config.model.name, config)
    tokenized = data.tokenize_pairs(pairs, tokenizer, arguments.max_length,
                                    arguments.max_prompt_length)
    batch = data.PreferenceCollator(tokenizer.pad_token_id)(tokenized)
    loss_function = functools.partial(spec.function, beta=config.dpo.beta)
    policy.eval()
    with torch.no_grad():
        _, step_statistics = dpo.preference_step(policy, reference, loss_function, spec, batch)
    sequences = [pair.prompt_ids + pair.chosen_ids for pair in tokenized]
    sequences += [pair.prompt_ids + pair.rejected_ids for pair in tokenized]
    return step_statistics["logps/chosen"], step_statistics["logps/rejected"], sequences


def trl_first_batch(arguments: argparse.Namespace, work_dir: Path, rows: list[dict]):
    """Summed log-probs and token ids of `rows`, computed as DPOTrainer's loss computes them."""
    import torch

    trainer = build_trl_trainer(arguments, work_dir, rows, max_steps=1)
    examples = [trainer.train_dataset[index] for index in range(len(rows))]
    batch = trainer.data_collator(examples)
    model = trainer.model
    model.eval()
    # DPOTrainer scores completion tokens with its fused LM head; mirror its loss inputs.
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=labels, fused_lm_head=True, use_cache=False)
    width = batch["input_ids"].shape[1] - 1
    logps = outputs.log_probs[:, -width:].sum(dim=1)
    chosen, rejected = logps.chunk(2)

    trainer.compute_loss(model, batch)  # records TRL's own batch means of logps/chosen, /rejected
    logged = {key: trainer._metrics["eval"][key][-1] for key in ("logps/chosen", "logps/rejected")}
    sequences = [ids[mask.bool()].tolist()
                 for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    return chosen, rejected, sequences, logged


def check_first_batch(arguments: argparse.Namespace, work_dir: Path) -> dict:
    import torch

    import data

    rows = read_rows(work_dir / "data" / "train.jsonl")[:arguments.batch_size]
    pairs = [data.PreferencePair(row["prompt"], row["chosen"], row["rejected"]) for row in rows]
    ours_chosen, ours_rejected, ours_sequences = ours_first_batch(arguments, work_dir, pairs)
    trl_chosen, trl_rejected, trl_sequences, trl_logged = trl_first_batch(arguments, work_dir, rows)

    failures = []
    if ours_sequences != trl_sequences:
        failures.append("the token ids of the first batch differ")
    comparisons = {
        "logps/chosen": (ours_chosen, trl_chosen),
        "logps/rejected": (ours_rejected, trl_rejected),
    }
    largest = 0.0
    for name, (ours, theirs) in comparisons.items():
        difference = float((ours - theirs).abs().max())
        largest = max(largest, difference)
        if not torch.allclose(ours, theirs, rtol=LOGPS_RELATIVE_TOLERANCE,
                              atol=LOGPS_ABSOLUTE_TOLERANCE):
            failures.append(f"{name} differ by up to {difference:.3g}: ours {ours.tolist()}, "
                            f"TRL {theirs.tolist()}")
        mean_difference = abs(float(ours.mean()) - trl_logged[name])
        if mean_difference > LOGPS_ABSOLUTE_TOLERANCE + LOGPS_RELATIVE_TOLERANCE * abs(
            trl_logged[name]
        ):
            failures.append(f"TRL's logged {name} mean {trl_logged[name]:.6g} differs from ours "
                            f"{float(ours.mean()):.6g}")
    return {"failures": failures, "largest_difference": largest,
            "mean_chosen": float(ours_chosen.mean()), "mean_rejected": float(ours_rejected.mean())}


# ---------------------------------------------------------------------------
# Children and the parent
# ---------------------------------------------------------------------------


def run_child(arguments: argparse.Namespace) -> None:
    """Run one job in this process and print its result as the last JSON line."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    work_dir = arguments.work_dir
    if arguments.child == "check":
        result = check_first_batch(arguments, work_dir)
    elif arguments.child == "trl":
        result = run_trl(arguments, work_dir)
    else:
        result = run_ours(arguments, work_dir, precompute=arguments.child == "ours-precomputed")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def spawn(arguments: argparse.Namespace, work_dir: Path, child: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", child,
               "--work-dir", str(work_dir), "--pairs", str(arguments.pairs),
               "--batch-size", str(arguments.batch_size), "--max-length", str(arguments.max_length),
               "--max-prompt-length", str(arguments.max_prompt_length),
               "--beta", str(arguments.beta), "--learning-rate", str(arguments.learning_rate),
               "--seed", str(arguments.seed)]
    environment = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    completed = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True,
                               text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-8000:])
        raise SystemExit(f"The {child} run failed with exit status {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Best float32 matmul FLOP/s of this machine over `repeats` timings."""
    import torch

    left, right = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(left, right)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(left, right)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def summarise_runs(name: str, runs: list[dict], facts: dict, arguments, peak: float,
                   reference_forward: bool) -> dict:
    pairs_per_second = [arguments.pairs / run["seconds"] for run in runs]
    tokens_per_second = [facts["tokens"] / run["seconds"] for run in runs]
    flops_per_token = (8 if reference_forward else 6) * facts["parameters"]
    median_tokens = statistics.median(tokens_per_second)
    return {
        "name": name,
        "pairs_per_second": statistics.median(pairs_per_second),
        "tokens_per_second": median_tokens,
        "peak_rss_mib": [run["peak_rss_mib"] for run in runs],
        "mfu": flops_per_token * median_tokens / peak,
        "runs": len(runs),
    }


def markdown_table(summaries: list[dict], trl: dict) -> str:
    lines = ["| implementation | pairs/s (median) | tokens/s (median) | ratio ours/TRL (pairs/s) "
             "| peak RSS, MiB (median, min-max) | MFU |",
             "|---|---|---|---|---|---|"]
    for summary in summaries:
        ratio = summary["pairs_per_second"] / trl["pairs_per_second"]
        memory = summary["peak_rss_mib"]
        lines.append(f"| {summary['name']} | {summary['pairs_per_second']:.2f} | "
                     f"{summary['tokens_per_second']:.0f} | {ratio:.2f} | "
                     f"{statistics.median(memory):.0f} ({min(memory):.0f}-{max(memory):.0f}) | "
                     f"{summary['mfu']:.2%} |")
    return "\n".join(lines)


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        run_child(arguments)
        return
    if arguments.pairs % arguments.batch_size:
        raise SystemExit(f"--pairs={arguments.pairs} must be a multiple of --batch-size="
                         f"{arguments.batch_size}, so both train whole batches for one epoch")

    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="dpo-vs-trl-"))
    print(f"load average before: {load_average()}", flush=True)
    facts = prepare(arguments, work_dir)
    print(f"data: {arguments.pairs} training pairs from {facts['source']}, "
          f"{facts['tokens']} tokens, longest pair {facts['longest_pair']} tokens; "
          f"model: {facts['parameters']} parameters outside the input embedding", flush=True)

    check = spawn(arguments, work_dir, "check")
    if check["failures"]:
        print("FAILED: the first batch's sequence log-probs of ours and TRL differ:",
              file=sys.stderr)
        for failure in check["failures"]:
            print(f"  - {failure}", file=sys.stderr)
        raise SystemExit(1)
    print(f"first batch log-probs agree: mean logps/chosen {check['mean_chosen']:.4f}, "
          f"logps/rejected {check['mean_rejected']:.4f}, largest difference "
          f"{check['largest_difference']:.2g}", flush=True)

    children = ["ours", "trl"]
    if supports_precomputed_reference():
        children.append("ours-precomputed")
    runs: dict[str, list[dict]] = {child: [] for child in children}
    for repeat in range(arguments.repeats):
        for child in children:
            result = spawn(arguments, work_dir, child)
            runs[child].append(result)
            print(f"round {repeat + 1} {child}: {result['seconds']:.2f} s for "
                  f"{result['steps']} steps, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)

    peak = measure_matmul_peak()
    names = {"ours": "ours (dpo.py)", "trl": "TRL DPOTrainer", "ours-precomputed": PRECOMPUTED}
    summaries = [summarise_runs(names[child], runs[child], facts, arguments, peak,
                                reference_forward=child != "ours-precomputed")
                 for child in children]
    trl = summaries[1]
    print(f"load average after: {load_average()}")
    print(f"matmul peak (float32, 2048 x 2048): {peak / 1e9:.1f} GFLOP/s")
    print()
    print(markdown_table(summaries, trl))


if __name__ == "__main__":
    main()
