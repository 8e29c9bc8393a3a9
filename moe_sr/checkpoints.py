"""Loading stage experts: the released ``moe_stage{k}.ckpt`` files and our safetensors export.

Released files (``Unet/moe_stage{0..3}.ckpt`` of tencent-ailab/Frequency_Aug_VAE_MoESR) are plain
state dicts of the official ``LatentDiffusionExtremeSREWA`` (3.65 GB each). They hold four groups
(``../shared/reference/manifests/moe_stage_ckpt.json``):

* the 12 LDM schedule buffers (``betas``, ``alphas_cumprod``, ...), each ``[1000]``;
* ``model.diffusion_model.*``: the raw UNet weights;
* ``model_ema.*``: the EMA UNet weights, named ``model_ema.`` + the raw name without ``model.``
  and with **every dot removed** (``model.diffusion_model.input_blocks.5.2.moe_blocks.0.0.weight``
  -> ``model_ema.diffusion_modelinput_blocks52moe_blocks00weight``), plus ``model_ema.decay`` and
  ``model_ema.num_updates``; the official SR script copies these into the model before sampling;
* ``first_stage_model.*``: an LDM vq-f4 autoencoder that SR does not use (the FA-VAE replaces it).

We map the EMA names from the model's own ``state_dict`` keys (checked to be a bijection), open the
file with ``torch.load(mmap=True, weights_only=True)`` and copy only the UNet tensors we need into
the model, releasing each tensor's file pages after the copy. Peak memory is therefore about one
UNet (1.7 GB), not the file (3.65 GB), and the unused groups are never read.

Our own format (:func:`save_expert`): one safetensors file per stage expert with the EMA weights
only, the resolved UNet config, the stage index, the number of stages and the timestep interval in
the metadata, so a wrong order fails loudly (:func:`resolve_expert_order`).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ldm.checkpoint import (
    CONFIG_KEY,
    CheckpointError,
    CheckpointMismatchError,
    describe_state_dict,
    load_torch_file,
    mismatch_message,
    parse_json_metadata,
    read_safetensors_metadata,
    save_pretrained,
)
from ldm.diffusion.schedule import LDM_BUFFER_NAMES

logger = logging.getLogger(__name__)

#: The 12 schedule buffers of an LDM ``DDPM`` state dict, in file order.
SCHEDULE_BUFFER_NAMES = LDM_BUFFER_NAMES
RAW_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_MODULE_NAME = "diffusion_model"
#: EMA bookkeeping tensors that are not weights.
EMA_EXTRA_KEYS = ("model_ema.decay", "model_ema.num_updates")

#: Metadata keys of our stage expert safetensors files.
STAGE_KEY = "moe_sr.stage"
NUM_STAGES_KEY = "moe_sr.num_stages"
T_RANGE_KEY = "moe_sr.t_range"
WEIGHTS_KEY = "moe_sr.weights"

Weights = Literal["ema", "raw"]
OnMismatch = Literal["error", "warn", "ignore"]

_STAGE_IN_NAME = re.compile(r"stage[_-]?(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class ExpertInfo:
    """What a loaded stage expert file says about itself."""

    path: Path
    #: ``"released-ema"``, ``"released-raw"`` or ``"safetensors"``.
    source: str
    stage: int | None = None
    num_stages: int | None = None
    t_range: tuple[int, int] | None = None
    #: ``model_ema.num_updates`` of a released file (EMA weights only).
    ema_num_updates: int | None = None


# --------------------------------------------------------------------------- key maps


def ema_key_map(model_keys: Iterable[str], module_name: str = EMA_MODULE_NAME) -> dict[str, str]:
    """``our UNet key -> released EMA key`` (``model_ema.`` + module name + key without dots).

    Raises :class:`CheckpointError` if two of our keys collapse onto the same EMA name (the map
    must be a bijection, or a released file could load a tensor into the wrong place).
    """
    keys = list(model_keys)
    mapping = {k: EMA_PREFIX + module_name + k.replace(".", "") for k in keys}
    seen: dict[str, str] = {}
    clashes = []
    for ours, theirs in mapping.items():
        if theirs in seen:
            clashes.append(f"{seen[theirs]} and {ours} -> {theirs}")
        seen[theirs] = ours
    if clashes:
        raise CheckpointError(
            "the EMA naming (dots removed) is ambiguous for this model: " + "; ".join(clashes[:5])
        )
    return mapping


def raw_key_map(model_keys: Iterable[str]) -> dict[str, str]:
    """``our UNet key -> released raw key`` (``model.diffusion_model.`` + key)."""
    return {k: RAW_PREFIX + k for k in model_keys}


def stage_from_filename(path: str | os.PathLike) -> int | None:
    """The stage number in a file name such as ``moe_stage2.ckpt`` (None when there is none)."""
    found = _STAGE_IN_NAME.findall(Path(path).name)
    return int(found[-1]) if found else None


# --------------------------------------------------------------------------- page release


def _release_pages(t: torch.Tensor) -> None:
    """Drop the file pages behind ``t`` from this process's resident set (Linux, mmap only).

    ``t`` must live in a read-only private file mapping (``torch.load(mmap=True)``): the kernel
    then simply re-reads the file if the pages are touched again, so this is safe; it keeps the
    resident set at one tensor of file pages instead of everything read so far.
    """
    if _LIBC is None or not t.is_contiguous() or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = -(-start // page) * page
    hi = end // page * page
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_MADV_DONTNEED = 4


# --------------------------------------------------------------------------- released .ckpt


def _open_mmap(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"stage expert checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a PyTorch zip checkpoint (truncated download or another format?); "
            f"expected a released moe_stage*.ckpt (3,650,066,050 bytes) or a .safetensors export"
        )
    obj = load_torch_file(path, map_location="cpu", mmap=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint of the same model
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def check_schedule_buffers(
    file_sd: Mapping[str, torch.Tensor],
    schedule: Any,
    *,
    on_mismatch: OnMismatch = "error",
    what: str = "checkpoint",
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> list[str]:
    """Compare the file's schedule buffers with ``schedule.ldm_buffers()``.

    Returns the names that differ. A file without schedule buffers is accepted (nothing to check).
    """
    ours = schedule.ldm_buffers()
    bad = []
    for name in SCHEDULE_BUFFER_NAMES:
        if name not in file_sd or name not in ours:
            continue
        theirs = file_sd[name].to(torch.float64)
        mine = torch.as_tensor(ours[name]).to(torch.float64)
        if theirs.shape != mine.shape or not torch.allclose(theirs, mine, rtol=rtol, atol=atol):
            diff = (
                (theirs - mine).abs().max().item() if theirs.shape == mine.shape else float("nan")
            )
            bad.append(f"{name} (max diff {diff:.3g})")
    if bad and on_mismatch != "ignore":
        msg = (
            f"{what}: its noise schedule differs from the pipeline's schedule in {', '.join(bad)}. "
            "The stage expert was trained with another schedule (check linear_start / linear_end / "
            "num_timesteps in the config)."
        )
        if on_mismatch == "error":
            raise CheckpointMismatchError(msg)
        warnings.warn(msg, stacklevel=3)
    return bad


def load_released_stage(
    path: str | os.PathLike,
    unet: nn.Module,
    *,
    weights: Weights = "ema",
    schedule: Any = None,
    schedule_check: OnMismatch = "error",
) -> ExpertInfo:
    """Load one released ``moe_stage{k}.ckpt`` into ``unet`` (in place); return its info.

    ``weights="ema"`` (default, what the official SR script samples with) takes ``model_ema.*``;
    ``"raw"`` takes ``model.diffusion_model.*``. Strict: every UNet key must be found with the
    right shape and the chosen group must hold nothing else. The other groups are never read.
    """
    path = Path(path)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    file_sd = _open_mmap(path)
    model_sd = unet.state_dict()
    if weights == "ema":
        keymap = ema_key_map(model_sd)
        group = {k for k in file_sd if k.startswith(EMA_PREFIX)} - set(EMA_EXTRA_KEYS)
        other = (
            "raw weights (weights='raw')" if any(k.startswith(RAW_PREFIX) for k in file_sd) else ""
        )
    else:
        keymap = raw_key_map(model_sd)
        group = {k for k in file_sd if k.startswith(RAW_PREFIX)}
        other = (
            "EMA weights (weights='ema')" if any(k.startswith(EMA_PREFIX) for k in file_sd) else ""
        )
    if not group:
        hint = (
            f" It holds {other} instead."
            if other
            else f" It holds {describe_state_dict(file_sd)}, expected an SS-MoE stage expert "
            "(a released moe_stage{k}.ckpt or our stage expert .safetensors): check which file "
            "goes to which option."
        )
        raise CheckpointMismatchError(
            f"{path} has no {weights} UNet weights "
            f"({EMA_PREFIX if weights == 'ema' else RAW_PREFIX}*).{hint}"
        )
    inverse = {v: k for k, v in keymap.items()}
    missing = sorted(k for k, fk in keymap.items() if fk not in file_sd)
    unexpected = sorted(group - set(inverse))
    wrong = [
        f"{k}: file {tuple(file_sd[fk].shape)} vs model {tuple(model_sd[k].shape)}"
        for k, fk in keymap.items()
        if fk in file_sd and tuple(file_sd[fk].shape) != tuple(model_sd[k].shape)
    ]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(
            mismatch_message(
                missing,
                unexpected,
                wrong,
                what=f"{path} ({weights} UNet weights)",
                hint="Is the UNet config the one the file was trained with (configs/moe_sr/sr8x.yaml)?",
            )
        )
    if schedule is not None:
        check_schedule_buffers(file_sd, schedule, on_mismatch=schedule_check, what=str(path))
    with torch.no_grad():
        for ours, theirs in keymap.items():
            src = file_sd[theirs]
            model_sd[ours].copy_(src)
            _release_pages(src)
    num_updates = None
    if weights == "ema" and "model_ema.num_updates" in file_sd:
        num_updates = int(file_sd["model_ema.num_updates"].item())
    del file_sd, model_sd  # unmaps the file
    logger.info("loaded %s UNet weights from %s", weights, path)
    return ExpertInfo(
        path=path,
        source=f"released-{weights}",
        stage=stage_from_filename(path),
        ema_num_updates=num_updates,
    )


# --------------------------------------------------------------------------- our safetensors


def read_expert_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Stage, number of stages, t-range and config stored in one of our stage expert files ({} if
    none)."""
    meta = read_safetensors_metadata(path)
    out: dict[str, Any] = {}
    try:
        if STAGE_KEY in meta:
            out["stage"] = _plain_int(parse_json_metadata(path, meta, STAGE_KEY))
        if NUM_STAGES_KEY in meta:
            out["num_stages"] = _plain_int(parse_json_metadata(path, meta, NUM_STAGES_KEY))
        if T_RANGE_KEY in meta:
            lo, hi = parse_json_metadata(path, meta, T_RANGE_KEY)
            out["t_range"] = (_plain_int(lo), _plain_int(hi))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: malformed stage expert metadata ({err})") from None
    if CONFIG_KEY in meta:
        out["config"] = parse_json_metadata(path, meta, CONFIG_KEY)
    return out


def _plain_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def load_expert_safetensors(path: str | os.PathLike, unet: nn.Module) -> ExpertInfo:
    """Load one of our stage expert files into ``unet`` (strict), one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"stage expert file {path} does not exist")
    model_sd = unet.state_dict()
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            missing = sorted(set(model_sd) - keys)
            unexpected = sorted(keys - set(model_sd))
            wrong = [
                f"{k}: file {shapes[k]} vs model {tuple(model_sd[k].shape)}"
                for k in model_sd
                if k in keys and shapes[k] != tuple(model_sd[k].shape)
            ]
            if missing or unexpected or wrong:
                raise CheckpointMismatchError(
                    mismatch_message(missing, unexpected, wrong, what=str(path))
                )
            with torch.no_grad():
                for k in model_sd:
                    model_sd[k].copy_(f.get_tensor(k))
    except SafetensorError as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    meta = read_expert_metadata(path)
    return ExpertInfo(
        path=path,
        source="safetensors",
        stage=meta.get("stage"),
        num_stages=meta.get("num_stages"),
        t_range=meta.get("t_range"),
    )


def load_expert(
    path: str | os.PathLike,
    unet: nn.Module,
    *,
    weights: Weights = "ema",
    schedule: Any = None,
    schedule_check: OnMismatch = "error",
) -> ExpertInfo:
    """Load a released ``.ckpt``/``.pth`` or one of our ``.safetensors`` stage experts into
    ``unet``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if weights != "ema":
            raise ValueError(f"{path}: our safetensors stage experts hold EMA weights only")
        return load_expert_safetensors(path, unet)
    return load_released_stage(
        path, unet, weights=weights, schedule=schedule, schedule_check=schedule_check
    )


def save_expert(
    unet: nn.Module,
    path: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    stage: int,
    num_stages: int,
    t_range: tuple[int, int],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``unet`` (its EMA weights, already copied in) as one of our stage expert files.

    ``config`` is the UNet's ``{target, params}``; ``t_range`` the half-open timestep interval
    ``[lo, hi)`` that the stage expert serves.
    """
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    lo, hi = (int(v) for v in t_range)
    meta = {
        STAGE_KEY: stage,
        NUM_STAGES_KEY: num_stages,
        T_RANGE_KEY: [lo, hi],
        WEIGHTS_KEY: "ema",
        **dict(metadata or {}),
    }
    return save_pretrained(unet, path, config, metadata=meta)


# --------------------------------------------------------------------------- ordering


def _metadata_stage(path: Path) -> int | None:
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return read_expert_metadata(path).get("stage")


def resolve_expert_order(paths: Sequence[str | os.PathLike], num_stages: int) -> list[Path]:
    """Put stage expert files in stage order (index k serves stage k).

    Files whose metadata names a stage go to that stage; the others fill the remaining stages in
    the order given. A file name with a stage number (``moe_stage2.ckpt``) must agree with the
    position the file ends up in; anything else is an error (a swapped pair of stage experts would
    otherwise produce plausible-looking but wrong images).
    """
    paths = [Path(p) for p in paths]
    if len(paths) != num_stages:
        raise ValueError(
            f"got {len(paths)} expert checkpoint(s) for {num_stages} stages; give one per stage, "
            "in stage order (stage 0 serves the lowest timesteps)"
        )
    slots: list[Path | None] = [None] * num_stages
    rest = []
    for p in paths:
        stage = _metadata_stage(p)
        if stage is None:
            rest.append(p)
            continue
        if not 0 <= stage < num_stages:
            raise ValueError(f"{p}: its metadata says stage {stage}, outside 0..{num_stages - 1}")
        if slots[stage] is not None:
            raise ValueError(f"{slots[stage]} and {p} both say they are stage {stage}")
        slots[stage] = p
    free = iter(i for i, s in enumerate(slots) if s is None)
    for p in rest:
        slots[next(free)] = p
    ordered = [s for s in slots if s is not None]
    problems = []
    for k, p in enumerate(ordered):
        named = stage_from_filename(p)
        if named is not None and named != k:
            problems.append(f"{p.name} is at stage position {k} but its name says stage {named}")
    if problems:
        raise ValueError(
            "stage expert order mismatch: "
            + "; ".join(problems)
            + ". List the checkpoints in stage order (moe_stage0 ... moe_stage"
            + f"{num_stages - 1}), or rename the files."
        )
    return ordered


def check_expert_interval(info: ExpertInfo, stage: int, interval: tuple[int, int]) -> None:
    """Error if a file's recorded stage / t-range disagrees with the pipeline's stage schedule."""
    if info.stage is not None and info.source == "safetensors" and info.stage != stage:
        raise ValueError(f"{info.path}: metadata stage {info.stage}, loaded as stage {stage}")
    if info.t_range is not None and tuple(info.t_range) != tuple(interval):
        raise ValueError(
            f"{info.path}: trained for timesteps {list(info.t_range)} but the stage schedule "
            f"gives stage {stage} the interval {list(interval)}; use the stage boundaries the "
            "stage experts were trained with"
        )
