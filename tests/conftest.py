"""Test defaults: single-threaded torch, offline hubs, the reference data folder."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

try:  # the fuzz tests (tests/test_fuzz.py): few examples by default, many with the slow profile
    from hypothesis import HealthCheck, settings

    _fuzz = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
    settings.register_profile("default", max_examples=25, derandomize=True, **_fuzz)
    settings.register_profile("slow", max_examples=1000, **_fuzz)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # hypothesis is a dev dependency; test_fuzz.py skips without it
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent


def reference_dir() -> Path:
    """``$MOESR_REFERENCE_DIR`` (e.g. a newer fixture set of the same layout) or the copy of
    the reference data that ships with the repository (``tests/reference``)."""
    env = os.environ.get("MOESR_REFERENCE_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / "tests" / "reference"


@pytest.fixture(scope="session")
def reference_root() -> Path:
    root = reference_dir()
    if not root.is_dir():
        pytest.skip(f"reference data not found at {root} (set MOESR_REFERENCE_DIR)")
    return root


@pytest.fixture(scope="session")
def manifests_dir(reference_root: Path) -> Path:
    return reference_root / "manifests"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
