"""The reference-fixture harness.

Discovers every fixture folder under ``$MOESR_REFERENCE_DIR/fixtures`` (default
``../shared/reference/fixtures``) and runs the checker for its layout. Model
fixtures are dispatched on the official class named in their ``config.json``
(so any fixture set of the same layout, other widths included, is checked by the
same code); the others on their folder name. A layout whose checker does not
exist yet is skipped with a reason naming the missing feature.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for fixture_checkers

from conftest import reference_dir  # noqa: E402

#: official class (config.json "cls") -> checker module, feature it needs
BY_CLASS = {
    "VQModelResiUnet": ("fa_vae_vqf4", "FA-VAE VQ-f4 decoder (fa_vae, issue 4)"),
    "AutoencoderKLAFF": ("fa_vae_klf8", "FA-VAE KL-f8 decoder (fa_vae, issue 4)"),
    "UNetModelWithFFNMoe": ("unet_ffnmoe", "UNet with FFN-MoE layers (ldm.unet, issue 3)"),
}
#: folder name -> checker module, feature it needs
BY_NAME = {
    "schedule": ("schedule", "noise schedule and DDIM sampler (ldm.diffusion, issue 3)"),
    "stage_routing": ("stage_routing", "stage schedule and timestep router (moe_sr, issue 5)"),
    "resize_and_colorfix": (
        "resize_and_colorfix",
        "MATLAB bicubic resize and colour fix (ldm.data / moe_sr, issue 3)",
    ),
}


def _fixture_dirs() -> list[Path]:
    root = reference_dir() / "fixtures"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir())


def _dispatch(fixture_dir: Path) -> tuple[str, str]:
    cfg = fixture_dir / "config.json"
    if cfg.is_file():
        cls = json.loads(cfg.read_text()).get("cls")
        if cls in BY_CLASS:
            return BY_CLASS[cls]
        raise AssertionError(f"{fixture_dir.name}: no checker for official class {cls!r}")
    if fixture_dir.name in BY_NAME:
        return BY_NAME[fixture_dir.name]
    raise AssertionError(
        f"{fixture_dir.name}: unknown fixture layout (no config.json, unknown name)"
    )


@pytest.mark.parametrize("fixture_dir", _fixture_dirs(), ids=lambda p: p.name)
def test_reference_fixture(fixture_dir: Path):
    module_name, feature = _dispatch(fixture_dir)
    try:
        checker = importlib.import_module(f"fixture_checkers.{module_name}")
    except ModuleNotFoundError as err:
        if err.name == f"fixture_checkers.{module_name}":
            pytest.skip(f"checker not written yet: needs {feature}")
        raise
    checker.check(fixture_dir)


def test_fixtures_found():
    if not reference_dir().is_dir():
        pytest.skip("no reference data here")
    assert _fixture_dirs(), f"no fixture folders under {reference_dir() / 'fixtures'}"
