"""Sweep report: the table and plots of a multirun, failed runs included."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import data
import models
import sweep_report

REPOSITORY = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(sweep_dir: Path, name: str, job_number: int, summary: dict | None,
              margins: dict[int, list[float]] | None = None, config: dict | None = None) -> Path:
    """Lay out one job directory the way Hydra and dpo.py write it."""
    run_dir = sweep_dir / name
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": job_number}}}),
                   run_dir / ".hydra" / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(config or {}), run_dir / ".hydra" / "config.yaml")
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if margins is not None:
        lines = [json.dumps({"step": step, "index": index, "margin": margin})
                 for step, values in margins.items() for index, margin in enumerate(values)]
        (run_dir / "eval_margins.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def completed_summary(loss_type: str, beta: float, accuracy: float, margin: float) -> dict:
    return {"status": "completed", "loss_type": loss_type, "beta": beta,
            "wall_time_seconds": 12.5, "rewards/accuracies": accuracy,
            "rewards/margins": margin, "rewards/margins_std": 0.25,
            "rewards/margin_correlation": 0.5, "loss": 0.3}


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    sweep = tmp_path / "multirun"
    write_run(sweep, "0_sigmoid_beta0.1", 0, completed_summary("sigmoid", 0.1, 0.75, 1.5),
              margins={0: [0.0, 0.0], 50: [1.0, 2.0, -0.5]})
    write_run(sweep, "2_sigmoid_beta5.0", 2, completed_summary("sigmoid", 5.0, 0.875, 3.0),
              margins={0: [0.0], 50: [3.0]})
    write_run(sweep, "10_ipo_beta0.1", 10, completed_summary("ipo", 0.1, 0.5, 0.25),
              margins={0: [0.0], 50: [0.25]})
    write_run(sweep, "1_rebel_beta0.1", 1,
              {"status": "failed", "loss_type": "rebel", "beta": 0.1, "wall_time_seconds": 0.5,
               "error": "DataError: dpo.loss_type=rebel needs reward columns\nsecond line"})
    write_run(sweep, "3_hinge_beta1", 3, None, config={"dpo": {"loss_type": "hinge", "beta": 1}})
    (sweep / "multirun.yaml").write_text("{}\n")
    return sweep


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_report_rows_in_job_order(sweep_dir):
    sweep_report.write_report(sweep_dir)
    rows = read_csv(sweep_dir / "summary.csv")
    assert [row["run"] for row in rows] == ["0_sigmoid_beta0.1", "1_rebel_beta0.1",
                                            "2_sigmoid_beta5.0", "3_hinge_beta1",
                                            "10_ipo_beta0.1"]


def test_report_completed_run_metrics(sweep_dir):
    sweep_report.write_report(sweep_dir)
    row = read_csv(sweep_dir / "summary.csv")[2]
    assert row["status"] == "completed"
    assert row["loss_type"] == "sigmoid"
    assert float(row["beta"]) == 5.0
    assert float(row["accuracy"]) == 0.875
    assert float(row["margin_mean"]) == 3.0
    assert float(row["margin_std"]) == 0.25
    assert float(row["margin_correlation"]) == 0.5
    assert float(row["wall_time_seconds"]) == 12.5
    assert row["error"] == ""


def test_report_shows_failed_run_with_error(sweep_dir):
    sweep_report.write_report(sweep_dir)
    row = read_csv(sweep_dir / "summary.csv")[1]
    assert row["status"] == "failed"
    assert row["loss_type"] == "rebel"
    assert row["error"].startswith("DataError: dpo.loss_type=rebel needs reward columns")
    assert row["accuracy"] == ""


def test_report_shows_run_without_summary(sweep_dir):
    sweep_report.write_report(sweep_dir)
    row = read_csv(sweep_dir / "summary.csv")[3]
    assert row["status"] == "missing"
    assert row["loss_type"] == "hinge"
    assert float(row["beta"]) == 1.0
    assert row["error"] == sweep_report.NO_SUMMARY_ERROR


def test_markdown_lists_failed_run(sweep_dir):
    sweep_report.write_report(sweep_dir)
    lines = (sweep_dir / "summary.md").read_text().splitlines()
    failed = [line for line in lines if line.startswith("| 1_rebel_beta0.1 |")]
    assert len(failed) == 1
    assert "| failed |" in failed[0]
    assert "DataError: dpo.loss_type=rebel needs reward columns |" in failed[0]
    assert "Final eval metrics of 5 runs (3 completed)" in "\n".join(lines)


def test_markdown_table_has_one_row_per_run(sweep_dir):
    sweep_report.write_report(sweep_dir)
    table = [line for line in (sweep_dir / "summary.md").read_text().splitlines()
             if line.startswith("|")]
    assert len(table) == 2 + 5
    assert all(line.count(" | ") == table[0].count(" | ") for line in table[2:])


def test_report_writes_png_plots(sweep_dir):
    paths = sweep_report.write_report(sweep_dir)
    for name in ("margin_vs_beta.png", "accuracy_vs_beta.png", "margin_histograms.png"):
        assert sweep_dir / name in paths
        assert (sweep_dir / name).read_bytes().startswith(PNG_SIGNATURE), name


def test_final_eval_margins_uses_last_step(sweep_dir):
    assert sweep_report.final_eval_margins(sweep_dir / "0_sigmoid_beta0.1") == [1.0, 2.0, -0.5]


def test_report_of_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        sweep_report.write_report(tmp_path / "absent")


def test_callback_writes_report_at_multirun_end(sweep_dir):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}})
    callback = sweep_report.SweepReport()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert (sweep_dir / "summary.csv").is_file()


def test_command_line_regenerates_report(sweep_dir):
    result = subprocess.run([sys.executable, "sweep_report.py", str(sweep_dir)], cwd=REPOSITORY,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert str(sweep_dir / "summary.md") in result.stdout.splitlines()


# ---------------------------------------------------------------------------
# A real multirun with one failing job
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX with random weights and a BPE tokenizer of the synthetic set."""
    directory = tmp_path_factory.mktemp("checkpoint")
    pairs = data.build_synthetic_pairs(64, seed=0)
    tokenizer = models.train_bpe_tokenizer(data.training_texts(pairs), vocab_size=300)
    architecture = OmegaConf.create({"hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                     "max_position_embeddings": 256})
    model = models.build_tiny_model(architecture, tokenizer, seed=0)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_multirun_report_shows_failed_job(tmp_path, tiny_checkpoint):
    sweep = tmp_path / "multirun"
    command = [
        sys.executable, "dpo.py", "-m", "dpo.loss_type=sigmoid", "dpo.beta=-1,0.5",
        f"model.name={tiny_checkpoint}", f"outputs_dir={tmp_path}", f"hydra.sweep.dir={sweep}",
        "wandb.enabled=false", "dataset.num_pairs=64", "dataset.max_length=64",
        "dataset.max_prompt_length=32", "training.batch_size=16", "training.max_steps=1",
        "training.eval_every=null",
    ]
    result = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True, check=False)
    rows = read_csv(sweep / "summary.csv")

    assert result.returncode == 1, result.stderr[-2000:]
    assert [row["status"] for row in rows] == ["failed", "completed"]
    assert rows[0]["error"] == "ValueError: dpo.beta=-1 must be positive, e.g. dpo.beta=5.0"
    assert float(rows[1]["beta"]) == 0.5
    assert (sweep / "margin_histograms.png").read_bytes().startswith(PNG_SIGNATURE)
