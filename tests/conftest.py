"""Shared fixtures: paths, Hydra configs composed in-process, real HH-RLHF rows."""

import gzip
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
HH_DIR = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base"
HH_FILE = HH_DIR / "test.jsonl.gz"


def compose_config(config_name: str, overrides: list[str]):
    """Compose configs/<config_name>.yaml with overrides, as the entry point would."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="session")
def hh_file() -> Path:
    if not HH_FILE.is_file():
        pytest.fail(f"Real HH-RLHF rows are expected at {HH_FILE}; the test suite reads them there")
    return HH_FILE


@pytest.fixture(scope="session")
def hh_rows(hh_file) -> list[dict]:
    with gzip.open(hh_file, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]
