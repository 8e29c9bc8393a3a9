"""Helpers shared by the fixture checkers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ATOL = 1e-4
RTOL = 1e-4


def load_io(fixture_dir: Path, name: str = "io.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(fixture_dir / name))


def load_json(fixture_dir: Path, name: str) -> dict:
    return json.loads((fixture_dir / name).read_text())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol=ATOL, rtol=RTOL):
    actual = actual.detach().to(expected.dtype).cpu()
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    if not expected.is_floating_point():
        mismatches = (actual != expected).sum().item()
        assert mismatches == 0, f"{name}: {mismatches} integer entries differ"
        return
    err = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{name}: max abs error {err:.3g}"
    )
