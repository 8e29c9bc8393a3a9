"""Reading and writing weights: Lightning ``.ckpt``, plain ``.pth``/``.pt``, ``.safetensors``.

* Files are never fully unpickled: ``torch.load(..., weights_only=True)``; objects that
  Lightning pickles next to the weights become inert stand-ins (:func:`load_torch_file`).
* Loading is strict. A mismatch raises :class:`CheckpointMismatchError`, which
  lists missing, unexpected and wrong-shape keys (shortened) and names the preset
  the file most likely belongs to.
* Our release format is one safetensors file per component whose metadata holds
  the resolved ``{target, params}`` config, so :func:`load_pretrained` rebuilds
  the model from the file alone.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import typing
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.atomic import atomic_write
from ldm.registry import Registry
from ldm.safe_text import printable

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]

#: Metadata key under which our safetensors files keep the model config (JSON).
CONFIG_KEY = "moe_sr.config"
FORMAT_KEY = "moe_sr.format"
FORMAT_VERSION = "1"


class CheckpointError(RuntimeError):
    """A file that cannot be read as a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the model."""


# --------------------------------------------------------------------------- reading


def _shorten(items: list[str], limit: int = 12) -> str:
    items = [printable(i, 200) for i in items]  # names from files: no newlines or escapes
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"


def _first_line(err: BaseException) -> str:
    """An error of a foreign reader (torch, safetensors) as one printable line."""
    text = str(err).strip()
    return printable(text.splitlines()[0] if text else type(err).__name__)


def read_state_dict(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> Tensors:
    """Return the flat ``name -> tensor`` dict stored in ``path``.

    Lightning checkpoints are unwrapped (``["state_dict"]``); plain state dicts
    are returned as they are. Non-tensor entries are dropped only from the
    Lightning wrapper (optimizer states, loops), never from a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): re-download or re-export it")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, map_location)
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80" and head[:2] != b"PK":
        raise CheckpointError(  # neither torch's zip format nor a (legacy) pickle
            f"{path} is not a PyTorch checkpoint (first bytes {head!r}; expected a zip "
            "archive or a pickle): check the file name, or re-download it"
        )
    obj = load_torch_file(path, map_location=map_location, mmap=_can_mmap(path))
    return unwrap_state_dict(obj, source=str(path))


#: Module prefixes of objects that training frameworks pickle next to the weights (Lightning
#: callbacks and loop state, OmegaConf hyper-parameters, numpy scalars in callback states).
BOOKKEEPING_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.", "omegaconf.",
                        "numpy.")  # fmt: skip
#: Harmless builtins such objects refer to (types used as values, plain containers).
_PLAIN_GLOBALS: dict[str, Any] = {
    f"builtins.{t.__name__}": t
    for t in (list, dict, tuple, set, frozenset, int, float, complex, str, bytes, bool, slice)
}
_PLAIN_GLOBALS.update({
    "collections.defaultdict": collections.defaultdict,
    "collections.OrderedDict": collections.OrderedDict,
    "typing.Any": typing.Any,
})  # fmt: skip


class IgnoredObject:
    """Inert stand-in for a pickled training-framework object: accepts any construction and
    state, keeps nothing and runs no code of the original class."""

    def __new__(cls, *args: Any, **kwargs: Any) -> IgnoredObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ignored {type(self).__name__}>"


def load_torch_file(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)`` that also opens training checkpoints.

    Lightning checkpoints may pickle callback classes, OmegaConf hyper-parameters or numpy
    scalars next to the weights, which ``weights_only`` refuses. When every unsupported global
    of the file belongs to :data:`BOOKKEEPING_PREFIXES` (or is a plain builtin type), the file
    is read again with each such object replaced by an inert :class:`IgnoredObject`; nothing of
    those packages is imported or run. Any other global is refused with a one-line
    :class:`CheckpointError` naming it.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as err:
        if "Unsupported global" not in str(err):
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (truncated or another format?): "
                f"{_first_line(err)}"
            ) from None
        first_error: Exception = err
    except Exception as err:  # pickle.UnpicklingError and friends
        first_error = err
    names = _unsupported_globals(path)
    foreign = [
        n for n in names if n not in _PLAIN_GLOBALS and not n.startswith(BOOKKEEPING_PREFIXES)
    ]
    if not names or foreign:
        shown = (
            ", ".join(printable(n, 100) for n in foreign)
            if foreign
            else printable(_first_line_with(first_error, "Unsupported global"))
        )
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and plain containers; "
            "refusing to unpickle them (torch.load weights_only=True). Re-export it as a "
            f"state dict or safetensors{' (' + shown + ')' if shown else ''}"
        ) from None
    stand_ins = [
        (_PLAIN_GLOBALS[n], n) if n in _PLAIN_GLOBALS
        else (type(n.rsplit(".", 1)[-1], (IgnoredObject,), {}), n)
        for n in names
    ]  # fmt: skip
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(
            f"{path} could not be read even with its training objects ignored: {_first_line(err)}"
        ) from None
    ignored = sorted(n for n in names if n not in _PLAIN_GLOBALS)
    logger.info("%s: read the tensors; ignored pickled objects of %s", path, ", ".join(ignored))
    return obj


def _unsupported_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) pickles cannot be listed
        return []


def _first_line_with(err: Exception, needle: str) -> str:
    return next((ln.strip() for ln in str(err).splitlines() if needle in ln), "")


def _can_mmap(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _read_safetensors(path: Path, map_location: str | torch.device) -> Tensors:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: {_first_line(err)}"
        ) from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: {_first_line(err)}"
        ) from None


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> Tensors:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{source} is not a flat state dict: non-tensor entries {_shorten(sorted(map(str, bad)))}"
        )
    return dict(obj)


def select_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """Keys starting with ``prefix``, with the prefix removed. Errors when none match."""
    if not prefix:
        return dict(state_dict)
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        tops = sorted({k.split(".", 1)[0] + "." for k in state_dict})
        raise CheckpointMismatchError(
            f"no key starts with {prefix!r}; top-level prefixes in the file: {_shorten(tops)}"
        )
    return out


# --------------------------------------------------------------------------- strict loading


def diff_state_dict(
    model_sd: Mapping[str, torch.Tensor], file_sd: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys, and ``key: file shape vs model shape`` lines."""
    return diff_shapes(
        {k: tuple(v.shape) for k, v in model_sd.items()},
        {k: tuple(v.shape) for k, v in file_sd.items()},
    )


def diff_shapes(
    model_shapes: Mapping[str, tuple[int, ...]], file_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """:func:`diff_state_dict` on ``name -> shape`` tables."""
    missing = sorted(set(model_shapes) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(model_shapes))
    wrong = [
        f"{k}: file {file_shapes[k]} vs model {model_shapes[k]}"
        for k in model_shapes
        if k in file_shapes and model_shapes[k] != file_shapes[k]
    ]
    return missing, unexpected, wrong


def mismatch_message(
    missing: list[str], unexpected: list[str], wrong: list[str], *, what: str, hint: str = ""
) -> str:
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {_shorten(unexpected)}")
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}): {_shorten(wrong, 6)}")
    if hint:
        lines.append(f"  {hint}")
    return "\n".join(lines)


#: Callables ``state_dict -> preset name or None`` that name the likely preset in strict-loading
#: errors, registered with ``@PRESET_GUESSERS.register(name, priority=...)`` (higher priority is
#: tried first: the more specific guessers). The registering modules are found like config
#: targets (entry point ``moe_sr.registry``), so the table does not depend on import order.
PRESET_GUESSERS = Registry("preset guesser")


def guess_preset(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The first preset name a registered guesser gives for ``state_dict`` (``None``: none)."""
    for guess in PRESET_GUESSERS.values():
        name = guess(state_dict)
        if name:
            return name
    return None


def describe_state_dict(keys: Iterable[str]) -> str:
    """What a state dict holds, from its key names, for messages that say "<file> holds X,
    expected Y" when a file is given to the wrong option."""
    keys = list(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if has("model.diffusion_model.", "model_ema."):
        return "a latent-diffusion UNet training checkpoint (model.diffusion_model.* / model_ema.*)"
    if has("input_blocks.") and has("out."):
        return "a diffusion UNet (input_blocks.*, out.*)"
    if has("decoder.fusion_layer_", "decoder.unet_"):
        return "an FA-VAE (encoder, decoder with fuse layers)"
    if has("encoder.") and has("decoder."):
        return "an autoencoder (encoder.*, decoder.*)"
    if has("first_stage_model."):
        return "an autoencoder under first_stage_model.*"
    tops = sorted({k.split(".", 1)[0] for k in keys})
    return f"tensors named {_shorten(tops, 6)}.*" if tops else "no tensors"


def load_state_dict_strict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "checkpoint"
) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with a readable error."""
    missing, unexpected, wrong = diff_state_dict(model.state_dict(), state_dict)
    if missing or unexpected or wrong:
        preset = guess_preset(state_dict)
        hint = f"The file looks like preset {preset!r}." if preset else ""
        raise CheckpointMismatchError(
            mismatch_message(missing, unexpected, wrong, what=what, hint=hint)
        )
    model.load_state_dict(state_dict, strict=True)


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    prefix: str = "",
    ignore_prefixes: Iterable[str] = (),
) -> nn.Module:
    """Read ``path``, keep the keys under ``prefix`` (stripped), load strictly.

    ``ignore_prefixes`` names groups of keys that are expected in the file but
    belong to something else (e.g. ``loss.`` in LDM autoencoder checkpoints).
    """
    sd = read_state_dict(path)
    ignore = tuple(ignore_prefixes)
    if ignore:
        sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    sd = select_prefix(sd, prefix)
    load_state_dict_strict(model, sd, what=str(path))
    return model


# --------------------------------------------------------------------------- our format


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model``'s weights as safetensors with its ``{target, params}`` config.

    ``metadata`` adds JSON-serialisable entries (e.g. a stage expert's stage). The
    file is written to a temporary name and renamed, so a crash never leaves a
    half-written file under the final name.
    """
    from safetensors.torch import save_file

    from ldm.config import to_plain

    config = to_plain(config)
    if "target" not in config:
        raise ValueError("config must be a {target, params} mapping")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {FORMAT_KEY: FORMAT_VERSION, CONFIG_KEY: json.dumps(config, sort_keys=True)}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


#: Kinds of registered networks our weight files may rebuild (see ``ldm.registry.register``).
MODEL_KINDS = ("autoencoder", "unet")


def parse_json_metadata(path: str | os.PathLike, meta: Mapping[str, str], key: str) -> Any:
    """``json.loads(meta[key])`` with an error that names the file and the key."""
    try:
        return json.loads(meta[key])
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: metadata {key!r} is not valid JSON ({_first_line(err)}); the file was not written by "
            "moe-sr or was modified"
        ) from None


def read_pretrained_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``{target, params}`` config stored in one of our safetensors files (as data: build
    it only through :func:`load_pretrained` or ``instantiate(..., trusted=False)``)."""
    meta = read_safetensors_metadata(path)
    if CONFIG_KEY not in meta:
        raise CheckpointError(
            f"{path} has no {CONFIG_KEY!r} metadata: it is not a moe-sr release file. "
            "Build the model from a config preset and load the weights with load_weights()"
        )
    config = parse_json_metadata(path, meta, CONFIG_KEY)
    if not isinstance(config, dict) or not isinstance(config.get("target"), str):
        raise CheckpointError(f"{path}: metadata {CONFIG_KEY!r} is not a {{target, params}} config")
    return config


def load_pretrained(
    path: str | os.PathLike,
    *,
    kinds: Iterable[str] = MODEL_KINDS,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a model from one of our safetensors files (config in the metadata).

    The stored config is untrusted data: it may only name a registered network of one of
    ``kinds`` (e.g. ``("autoencoder",)``) with parameters that fit its signature; nothing is
    imported or run on its say (:func:`ldm.config.validate_untrusted`).
    """
    from ldm.config import validate_untrusted

    path = Path(path)
    config = read_pretrained_config(path)
    try:
        config = validate_untrusted(config, source=str(path), kinds=tuple(kinds))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    # sized like the file before any memory is spent: a config that asks for more is refused
    model = build_uninitialised(config, what=str(path), expect_shapes=safetensors_shapes(path))
    sd = _read_safetensors(path, map_location)
    load_state_dict_strict(model, sd, what=str(path))
    return model.eval()


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file: {_first_line(err)}"
        ) from None


def build_uninitialised(
    cfg: Mapping[str, Any],
    *,
    what: str = "config",
    expect_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> nn.Module:
    """Build ``cfg`` without spending time on random init (every tensor is loaded afterwards).

    The model is first built on the meta device; with ``expect_shapes`` (the file's tensors)
    any key or shape difference is refused before memory is allocated. A constructor that
    rejects the parameters gives a :class:`CheckpointError` naming ``what``.
    """
    from ldm.config import instantiate

    try:
        with torch.device("meta"):
            model = instantiate(cfg)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{what}: cannot build the model its config describes: {_first_line(err)}"
        ) from None
    if expect_shapes is not None:
        model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing, unexpected, wrong = diff_shapes(model_shapes, expect_shapes)
        if missing or unexpected or wrong:
            raise CheckpointMismatchError(mismatch_message(missing, unexpected, wrong, what=what))
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return instantiate(cfg)  # non-persistent buffers would stay uninitialised: init normally
    return model.to_empty(device="cpu")
