"""What a user can choose in the page, how it is checked, and the ``moe-sr`` command it equals.

The choices come from the pipeline's own tables (colour fixes, FFN-MoE routings, tiling modes,
the CLI's precisions), so the page offers exactly what ``moe-sr`` takes. Samplers: the list is
:data:`SAMPLERS`, the one place to extend when the pipeline offers more than DDIM.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ldm.diffusion.samplers import SAMPLERS as ALL_SAMPLERS
from moe_sr.cli.sr import DTYPES
from moe_sr.color_fix import COLOR_FIX_MODES
from moe_sr.pipeline import ROUTING_MODES

#: Samplers the pipeline runs (``ldm.diffusion.samplers``): DDIM (eta applies) and the
#: deterministic few-step solvers.
SAMPLERS: tuple[str, ...] = tuple(ALL_SAMPLERS)
TILE_MODES: tuple[str, ...] = ("auto", "on", "off")
PRECISIONS: tuple[str, ...] = tuple(DTYPES)  # fp32, fp16, bf16: the CLI's --dtype
MAX_SEED = 2**32 - 1  # exact in the browser's numbers (< 2**53); torch takes up to 2**64 - 1


class SettingsError(ValueError):
    """A setting the page cannot run with; the message says which and what is allowed."""


def available_devices() -> list[str]:
    """The compute devices of this machine: ``cpu``, then every accelerator by index."""
    devices = ["cpu"]
    if torch.accelerator.is_available():
        kind = torch.accelerator.current_accelerator().type
        devices += [f"{kind}:{i}" for i in range(torch.accelerator.device_count())]
    return devices


def device_name(device: str | torch.device) -> str:
    """One name per physical device (``cuda`` -> ``cuda:0``, the current one), so that the
    pool's slots per device are really per device."""
    dev = torch.device(device)
    if dev.type != "cpu" and dev.index is None:
        index = torch.accelerator.current_device_index() if torch.accelerator.is_available() else 0
        dev = torch.device(dev.type, index)
    return str(dev)


def precisions_for(device: str) -> list[str]:
    """UNet precisions worth offering on ``device`` (no float16 on the CPU: slow, partial)."""
    if torch.device(device).type == "cpu":
        return ["fp32", "bf16"]
    return list(PRECISIONS)


def _as_int(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _one_of(value, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise SettingsError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return str(value)


@dataclass(frozen=True)
class RunSettings:
    """The settings of one run (one or several images), as the page's form gives them."""

    steps: int
    eta: float
    seed: int
    color_fix: str
    ffn_moe_routing: str
    tile: str
    device: str
    precision: str
    sampler: str = "ddim"

    @classmethod
    def from_form(cls, *, max_steps: int, devices: Sequence[str], **form) -> RunSettings:
        """Checked settings from the form's values (numbers may arrive as floats or text)."""
        steps = _as_int(form["steps"], "steps")
        if not 1 <= steps <= max_steps:
            raise SettingsError(f"steps must be between 1 and {max_steps}, got {steps}")
        seed = _as_int(form["seed"], "seed")
        if not 0 <= seed <= MAX_SEED:
            raise SettingsError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
        try:
            eta = float(form["eta"])
        except (TypeError, ValueError):
            raise SettingsError(f"eta must be a number, got {form['eta']!r}") from None
        if not 0.0 <= eta <= 1.0:
            raise SettingsError(f"eta must be between 0 and 1, got {eta}")
        device = _one_of(form["device"], devices, "device")
        return cls(
            steps=steps,
            eta=eta,
            seed=seed,
            color_fix=_one_of(form["color_fix"], COLOR_FIX_MODES, "colour fix"),
            ffn_moe_routing=_one_of(form["ffn_moe_routing"], ROUTING_MODES, "FFN-MoE routing"),
            tile=_one_of(form["tile"], TILE_MODES, "tiling mode"),
            device=device,
            precision=_one_of(form["precision"], precisions_for(device), "precision"),
            sampler=_one_of(form.get("sampler", "ddim"), SAMPLERS, "sampler"),
        )

    @property
    def sampler_eta(self) -> float | None:
        """The eta the sampler takes: DDIM's, ``None`` for the deterministic solvers."""
        return self.eta if self.sampler == "ddim" else None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SizeLimits:
    """How large an input the server takes, in LR pixels (the output has 64x as many).

    Inputs over ``max_pixels`` are refused before any work, unless the run tiles (``tile ==
    "on"``) and they stay within ``max_tiled_pixels`` (0: never).
    """

    max_pixels: int = 256 * 256
    max_tiled_pixels: int = 1024 * 1024
    max_files: int = 16

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_tiled_pixels < 0 or self.max_files < 1:
            raise ValueError(f"size limits must be positive, got {self}")

    def refusal(self, name: str, width: int, height: int, tile: str) -> str | None:
        """Why an input of ``width`` x ``height`` is refused, or ``None`` when it is taken."""
        pixels = width * height
        if pixels <= self.max_pixels:
            return None
        tiled_limit = max(self.max_tiled_pixels, self.max_pixels)
        if tile == "on" and pixels <= tiled_limit:
            return None
        text = (
            f"{name} is {width}x{height} = {pixels:,} pixels, over this server's limit of "
            f"{self.max_pixels:,} pixels per image (--max-pixels)"
        )
        if tile != "on" and pixels <= tiled_limit:
            return text + f"; set tiling to 'on' to process it in tiles (up to {tiled_limit:,})"
        return text + "; crop or downscale it first"


def cli_command(model_args: Sequence[str], settings: RunSettings, input_name: str) -> str:
    """The ``moe-sr`` command that computes the same result from ``input_name``.

    ``model_args``: the server's model and resource options (``--config``, the weights, ...), as
    :func:`moe_sr.cli.app.model_cli_args` gives them.
    """
    argv = [
        "moe-sr",
        *model_args,
        "-i",
        input_name,
        "-o",
        "sr",
        "--sampler",
        settings.sampler,
        "--steps",
        str(settings.steps),
        *([] if settings.sampler_eta is None else ["--eta", f"{settings.sampler_eta:g}"]),
        "--seed",
        str(settings.seed),
        "--color-fix",
        settings.color_fix,
        "--ffn-moe-routing",
        settings.ffn_moe_routing,
        "--tile",
        settings.tile,
        "--device",
        settings.device,
        "--dtype",
        settings.precision,
    ]
    return shlex.join(argv)
