"""Time a DPO sweep with and without the reference log-prob cache.

    uv run python benchmarks/sweep_cache.py
    uv run python benchmarks/sweep_cache.py --override training.max_steps=20   # a quick check

Runs `dpo.py -m dpo.loss_type=<losses> dpo.beta=<betas>` twice from the same
SFT checkpoint, first with `dpo.precompute_ref_logps=false` (reference forward
pass at every step) and then with the cache on, starting from an empty cache
directory. It prints each sweep's total time, the sum of its runs' wall times
from their summary.json, the time of the one reference pass, and the cache
hits and misses that the runs logged. The load average is printed before and
after, because other processes on the machine slow both sweeps.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

import models  # noqa: E402

COMPUTED_PATTERN = re.compile(r"Reference log-probs: computed .* in ([0-9.]+) s")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="SFT checkpoint directory; default: newest SFT run under outputs/")
    parser.add_argument("--losses", default="sigmoid,hinge,ipo,rebel",
                        help="comma-separated dpo.loss_type values")
    parser.add_argument("--betas", default="0.1,1,5", help="comma-separated dpo.beta values")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="directory for both sweeps and the cache; default: a new temp dir")
    parser.add_argument("--override", action="append", default=[],
                        help="extra Hydra override for every run, repeatable")
    return parser.parse_args()


def run_sweep(name: str, sweep_dir: Path, overrides: list[str]) -> float:
    """Run one multirun in a subprocess and return its wall time in seconds."""
    command = [sys.executable, "dpo.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPOSITORY, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"[{name}] dpo.py exited with status {result.returncode}")
    print(f"[{name}] finished in {elapsed:.1f} s", flush=True)
    return elapsed


def sweep_figures(sweep_dir: Path) -> dict[str, float]:
    """Read the runs' summaries and logs: run count, summed wall time, cache events."""
    summaries = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/summary.json"))]
    logs = "\n".join(path.read_text() for path in sorted(sweep_dir.glob("*/dpo.log")))
    passes = [float(seconds) for seconds in COMPUTED_PATTERN.findall(logs)]
    return {
        "runs": len(summaries),
        "completed": sum(summary.get("status") == "completed" for summary in summaries),
        "run_seconds": sum(summary["wall_time_seconds"] for summary in summaries),
        "hits": logs.count("Reference log-probs: cache hit"),
        "misses": logs.count("Reference log-probs: cache miss"),
        "reference_pass_seconds": sum(passes),
    }


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} CPUs"


def main() -> None:
    arguments = parse_arguments()
    checkpoint = arguments.checkpoint or models.newest_sft_checkpoint(REPOSITORY / "outputs")
    if checkpoint is None:
        raise SystemExit("No SFT checkpoint found under outputs/; run `uv run python sft.py "
                         "wandb.enabled=false` first, or pass --checkpoint")
    work_dir = arguments.work_dir or Path(tempfile.mkdtemp(prefix="sweep-cache-benchmark-"))
    cache_dir = work_dir / "cache"
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise SystemExit(f"{cache_dir} is not empty; pass a new --work-dir")

    common = [f"dpo.loss_type={arguments.losses}", f"dpo.beta={arguments.betas}",
              f"model.name={checkpoint}", "wandb.enabled=false",
              f"dpo.reference_cache_dir={cache_dir}", *arguments.override]
    print(f"checkpoint: {checkpoint}\nwork dir: {work_dir}")
    print(f"load average before: {load_average()}", flush=True)

    without_seconds = run_sweep("without cache", work_dir / "without_cache",
                                [*common, "dpo.precompute_ref_logps=false"])
    with_seconds = run_sweep("with cache", work_dir / "with_cache",
                             [*common, "dpo.precompute_ref_logps=true"])
    without = sweep_figures(work_dir / "without_cache")
    cached = sweep_figures(work_dir / "with_cache")
    print(f"load average after: {load_average()}\n")

    print(f"{'sweep':<15} {'runs':>5} {'total s':>9} {'sum of runs s':>14} "
          f"{'ref pass s':>11} {'hits':>5} {'misses':>7}")
    for name, seconds, figures in (("without cache", without_seconds, without),
                                   ("with cache", with_seconds, cached)):
        print(f"{name:<15} {figures['completed']:>2}/{figures['runs']:<2} {seconds:>9.1f} "
              f"{figures['run_seconds']:>14.1f} {figures['reference_pass_seconds']:>11.1f} "
              f"{figures['hits']:>5} {figures['misses']:>7}")
    policy_seconds = cached["run_seconds"] - cached["reference_pass_seconds"]
    print(f"\nwith cache: {policy_seconds:.1f} s of policy training in the runs "
          f"+ {cached['reference_pass_seconds']:.1f} s for the one reference pass "
          f"+ {with_seconds - cached['run_seconds']:.1f} s outside the runs "
          "(interpreter and Hydra start-up, job set-up, the sweep report)")
    print(f"speed-up of the sweep: {without_seconds / with_seconds:.2f}x")


if __name__ == "__main__":
    main()
