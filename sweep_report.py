"""A table and plots of the final eval metrics of every run in a Hydra multirun.

    uv run python sweep_report.py outputs/multirun/dpo/2026-12-04_20-15-00

Hydra runs `SweepReport` at the end of every `dpo.py -m` sweep, because
configs/dpo.yaml lists it under `hydra.callbacks`. The command above writes
the same report again from an existing multirun directory. The report reads each
run's `summary.json` and `eval_margins.jsonl` and writes into the multirun
directory:

- `summary.csv` and `summary.md`: one row per run with status, loss type,
  beta, reward accuracy, mean eval margin, its standard deviation, the
  correlation of margins with reward differences (where the data has
  rewards), wall time, and the error of a failed run;
- `margin_vs_beta.png` and `accuracy_vs_beta.png`: one line per loss type;
- `margin_histograms.png`: the final eval margins of each run.
"""

import argparse
import atexit
import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

NO_SUMMARY_ERROR = "summary.json not found: the run was killed, or it is still running"
FILES = ("summary.csv", "summary.md", "margin_vs_beta.png", "accuracy_vs_beta.png",
         "margin_histograms.png")


@dataclass
class RunSummary:
    """One run's row of the report; metric names follow dpo.py's summary.json."""

    run: str
    status: str  # completed, failed, or missing when the run wrote no summary.json
    loss_type: str | None
    beta: float | None
    accuracy: float | None = None  # rewards/accuracies
    margin_mean: float | None = None  # rewards/margins
    margin_std: float | None = None  # rewards/margins_std
    margin_correlation: float | None = None  # rewards/margin_correlation
    wall_time_seconds: float | None = None
    error: str = ""


# ---------------------------------------------------------------------------
# Reading the runs
# ---------------------------------------------------------------------------


def job_number(run_dir: Path) -> int:
    """Hydra's job number of a run, read from `.hydra/hydra.yaml`; -1 when missing."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return -1
    number = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num", default=-1)
    return number if isinstance(number, int) else -1


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """List the job directories of a multirun, in job order."""
    run_dirs = [path for path in sweep_dir.iterdir() if path.is_dir()
                and ((path / ".hydra").is_dir() or (path / "summary.json").is_file())]
    return sorted(run_dirs, key=lambda path: (job_number(path), path.name))


def read_run(run_dir: Path) -> RunSummary:
    """Build a run's row from its summary.json, or from its Hydra config when that is missing."""
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        config_file = run_dir / ".hydra" / "config.yaml"
        config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
        return RunSummary(
            run=run_dir.name,
            status="missing",
            loss_type=OmegaConf.select(config, "dpo.loss_type", default=None),
            beta=OmegaConf.select(config, "dpo.beta", default=None),
            error=NO_SUMMARY_ERROR,
        )

    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    return RunSummary(
        run=run_dir.name,
        status=summary.get("status", "completed"),
        loss_type=summary.get("loss_type"),
        beta=summary.get("beta"),
        accuracy=summary.get("rewards/accuracies"),
        margin_mean=summary.get("rewards/margins"),
        margin_std=summary.get("rewards/margins_std"),
        margin_correlation=summary.get("rewards/margin_correlation"),
        wall_time_seconds=summary.get("wall_time_seconds"),
        error=summary.get("error", ""),
    )


def final_eval_margins(run_dir: Path) -> list[float]:
    """Return the margins of the last eval step in `eval_margins.jsonl`, or [] when missing."""
    margins_file = run_dir / "eval_margins.jsonl"
    if not margins_file.is_file():
        return []
    records = [json.loads(line) for line in margins_file.read_text().splitlines() if line.strip()]
    if not records:
        return []
    last_step = max(record["step"] for record in records)
    return [record["margin"] for record in records if record["step"] == last_step]


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def write_csv(path: Path, rows: list[RunSummary]) -> None:
    names = [field.name for field in fields(RunSummary)]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({name: "" if value is None else value
                             for name, value in asdict(row).items()})


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if not isinstance(value, int | float):  # a failed run may record an invalid setting as given
        return str(value)
    return f"{value:.4g}"


def markdown_cell(text: str) -> str:
    """Escape a value for a Markdown table cell, keeping its first line."""
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return first_line.replace("|", "\\|")


def write_markdown(path: Path, sweep_dir: Path, rows: list[RunSummary]) -> None:
    header = ("| run | status | loss | beta | accuracy | margin mean | margin std "
              "| corr(margin, Δr) | wall time (s) | error |")
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"Final eval metrics of {len(rows)} runs "
        f"({sum(row.status == 'completed' for row in rows)} completed). The margin is the "
        "implicit reward margin beta * h; corr(margin, Δr) is its Pearson correlation with "
        "the reward difference, shown where the data has rewards.",
        "",
        header,
        "|" + "---|" * header.count(" |"),
    ]
    for row in rows:
        cells = [row.run, row.status, row.loss_type or "–", format_number(row.beta),
                 format_number(row.accuracy), format_number(row.margin_mean),
                 format_number(row.margin_std), format_number(row.margin_correlation),
                 format_number(row.wall_time_seconds), markdown_cell(row.error)]
        lines.append("| " + " | ".join(markdown_cell(str(cell)) for cell in cells) + " |")
    lines += ["", "Plots: `margin_vs_beta.png`, `accuracy_vs_beta.png`, "
              "`margin_histograms.png` (runs that did not complete are left out of the "
              "first two)."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# The plots
# ---------------------------------------------------------------------------


def plot_metric_vs_beta(path: Path, rows: list[RunSummary], metric: str, ylabel: str,
                        title: str, error_metric: str | None = None) -> None:
    """Plot a metric of the completed runs against beta, one line per loss type."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    completed = [row for row in rows if row.status == "completed"
                 and isinstance(row.beta, int | float) and getattr(row, metric) is not None]
    for loss_type in sorted({row.loss_type for row in completed}):
        points = sorted((row for row in completed if row.loss_type == loss_type),
                        key=lambda row: row.beta)
        betas = [row.beta for row in points]
        values = [getattr(row, metric) for row in points]
        errors = [getattr(row, error_metric) or 0.0 for row in points] if error_metric else None
        axes.errorbar(betas, values, yerr=errors, marker="o", capsize=3, label=loss_type)

    if completed:
        if all(row.beta > 0 for row in completed):
            axes.set_xscale("log")
        axes.legend(title="loss")
    else:
        axes.text(0.5, 0.5, "no completed runs", ha="center", va="center",
                  transform=axes.transAxes)
    axes.set_xlabel("beta")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_margin_histograms(path: Path, sweep_dir: Path, rows: list[RunSummary]) -> None:
    """Draw one histogram of final eval margins per run, in a grid."""
    import matplotlib.pyplot as plt

    columns = min(4, max(1, len(rows)))
    grid_rows = max(1, math.ceil(len(rows) / columns))
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.2 * columns, 2.6 * grid_rows),
                                squeeze=False)
    for panel, row in zip(axes.flat, rows, strict=False):
        margins = final_eval_margins(sweep_dir / row.run)
        title = f"{row.loss_type}, beta {format_number(row.beta)}"
        if row.status == "completed" and margins:
            panel.hist(margins, bins=30, color="tab:blue", alpha=0.8)
            panel.axvline(0.0, color="black", linewidth=0.8)
        else:
            panel.text(0.5, 0.5, row.status if row.status != "completed" else "no margins",
                       ha="center", va="center", color="tab:red", transform=panel.transAxes)
            panel.set_xticks([])
            panel.set_yticks([])
        panel.set_title(title, fontsize=9)
        panel.tick_params(labelsize=7)
    for panel in list(axes.flat)[len(rows):]:
        panel.axis("off")
    figure.supxlabel("final eval margin (beta * h)")
    figure.supylabel("pairs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def write_report(sweep_dir: Path) -> list[Path]:
    """Write the table and plots of every run under `sweep_dir` into it; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"Multirun directory {sweep_dir} not found. Pass the directory that contains the "
            "numbered job directories, e.g. outputs/multirun/dpo/<date>_<time>"
        )
    rows = [read_run(run_dir) for run_dir in find_run_dirs(sweep_dir)]
    paths = [sweep_dir / name for name in FILES]

    write_csv(paths[0], rows)
    write_markdown(paths[1], sweep_dir, rows)
    plot_metric_vs_beta(paths[2], rows, "margin_mean", "mean eval margin (beta * h)",
                        "Eval reward margin vs beta (bars: std over pairs)",
                        error_metric="margin_std")
    plot_metric_vs_beta(paths[3], rows, "accuracy", "eval reward accuracy",
                        "Eval reward accuracy vs beta")
    plot_margin_histograms(paths[4], sweep_dir, rows)

    unfinished = [row.run for row in rows if row.status != "completed"]
    log.info("Sweep report of %d runs written to %s", len(rows), sweep_dir)
    if unfinished:
        log.warning("%d runs did not complete: %s", len(unfinished), ", ".join(unfinished))
    return paths


class SweepReport(Callback):
    """Hydra callback that writes the sweep report into the multirun directory.

    Hydra's basic sweeper (`BasicSweeper.sweep` in hydra-core 1.3.8) raises the
    first failed job's error after its batch of jobs has run, and then Hydra
    skips `on_multirun_end`. So the callback
    also registers an exit handler at the start of the multirun, which writes
    the report when the process exits without reaching `on_multirun_end`.
    """

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        atexit.register(self._write_after_failure)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        atexit.unregister(self._write_after_failure)
        write_report(Path(config.hydra.sweep.dir))

    def _write_after_failure(self) -> None:
        if self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        log.warning("The multirun stopped before its end (a job failed or it was interrupted); "
                    "writing the sweep report of the runs so far")
        try:
            write_report(self.sweep_dir)
        except Exception:
            log.exception("Writing the sweep report to %s failed", self.sweep_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path,
                        help="multirun directory, e.g. outputs/multirun/dpo/<date>_<time>")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for path in write_report(arguments.sweep_dir):
        print(path)


if __name__ == "__main__":
    main()
