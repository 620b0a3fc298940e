"""The SLURM launcher config composes with dpo.yaml when the `slurm` extra is installed."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="needs the slurm extra: uv sync --extra slurm")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def compose_launcher(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose(config_name="dpo", overrides=["hydra/launcher=slurm", *overrides],
                         return_hydra_config=True)
    return config.hydra.launcher


def test_slurm_launcher_selects_submitit():
    launcher = compose_launcher()
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")


def test_slurm_launcher_keeps_project_defaults():
    launcher = compose_launcher()
    assert launcher.timeout_min == 240
    assert launcher.gpus_per_node == 1
    assert launcher.tasks_per_node == 1


def test_slurm_launcher_accepts_overrides():
    launcher = compose_launcher("hydra.launcher.partition=gpu", "hydra.launcher.qos=high")
    assert launcher.partition == "gpu"
    assert launcher.qos == "high"
