"""Assemble a :class:`~moe_sr.pipeline.MoESRPipeline` from a config and weight files.

The config (``configs/moe_sr/sr8x.yaml``) names the stage expert UNet preset, the FA-VAE preset, the
noise schedule, the stage boundaries and the sampler defaults. Weights come from

* the release: four ``Unet/moe_stage{k}.ckpt`` (EMA weights by default) and
  ``first_stage_models/vq-f4/fa_vae.pth``;
* or our safetensors: one file per stage expert (stage, t-range and UNet config in the metadata) and
  one for the FA-VAE, e.g. a folder written by :func:`export_pipeline`
  (:func:`build_pipeline_from_folder`).

Stage experts are loaded one at a time (peak memory: the stage experts so far plus one file's
tensors).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from ldm.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    build_uninitialised,
    describe_state_dict,
    load_pretrained,
    load_state_dict_strict,
    read_pretrained_config,
    read_state_dict,
    safetensors_shapes,
)
from ldm.config import (
    ConfigError,
    check_config_tree,
    check_params,
    load_config,
    one_line_error,
    parse_overrides,
    resolve_in_place,
    to_plain,
    validate_untrusted,
)
from ldm.diffusion.samplers import check_sampler_options
from ldm.diffusion.schedule import NoiseSchedule, build_schedule
from moe_sr.checkpoints import (
    OnMismatch,
    Weights,
    check_expert_interval,
    load_expert,
    read_expert_metadata,
    resolve_expert_order,
    save_expert,
)
from moe_sr.color_fix import COLOR_FIX_MODES
from moe_sr.pipeline import ROUTING_MODES, MoESRPipeline
from moe_sr.stages import StageSchedule
from moe_sr.tiling import TilingConfig

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "moe_sr/sr8x"
_REQUIRED = ("unet", "vae", "schedule", "stages")
_KNOWN = (*_REQUIRED, "sampler", "color_fix", "ffn_moe_routing", "tiling")


def load_pipeline_config(
    config: str | os.PathLike | Mapping[str, Any] = DEFAULT_CONFIG, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """The resolved pipeline config as a plain dict (a preset name, a YAML path or a mapping)."""
    from omegaconf import OmegaConf

    if isinstance(config, (Mapping, DictConfig)):
        base = OmegaConf.create(to_plain(config))
    else:
        base = load_config(config, resolve=False)
    overrides = list(overrides)
    if overrides:
        try:
            base = OmegaConf.merge(base, parse_overrides(overrides, what="--set"))
        except ValueError as err:  # OmegaConf's errors are ValueErrors
            raise ConfigError(f"--set: {one_line_error(err)}") from None
    cfg = to_plain(resolve_in_place(base))
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"pipeline config must be a mapping, got {type(cfg).__name__}")
    check_pipeline_config(cfg)
    return dict(cfg)


def _sampler_section(
    name: str = "ddim",
    steps: int = 200,
    eta: float = 1.0,
    seed: int = 42,
    spacing: str | None = None,
    restart_at_stages: bool = False,
) -> None:
    """The keys and types of the config's ``sampler:`` section (``ldm.diffusion.samplers``)."""


def check_pipeline_config(cfg: Mapping[str, Any]) -> None:
    """Every key of a pipeline config, checked before anything is built: sections known and
    complete, targets and parameters of ``unet`` / ``vae``, the ``sampler`` and ``tiling``
    keys and types, the choices, the stages and the schedule. Raises :class:`ConfigError`."""
    missing = [k for k in _REQUIRED if k not in cfg]
    unknown = sorted(set(cfg) - set(_KNOWN))
    if missing or unknown:
        raise ConfigError(
            f"pipeline config: missing {missing}, unknown {unknown}; expected keys {list(_KNOWN)} "
            "(see configs/moe_sr/sr8x.yaml)"
        )
    for key in ("unet", "vae"):
        if not isinstance(cfg[key], Mapping) or "target" not in cfg[key]:
            raise ConfigError(f"pipeline config: {key} must be a {{target, params}} mapping")
        check_config_tree(cfg[key], key)
    for key, fn in (("sampler", _sampler_section), ("tiling", TilingConfig)):
        section = cfg.get(key)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ConfigError(f"pipeline config: {key} must be a mapping, got {section!r}")
        check_params(fn, section, key, require_all=False, kind="section")
    sampler = dict(cfg.get("sampler") or {})
    try:
        TilingConfig(**dict(cfg.get("tiling") or {}))
        StageSchedule(cfg["stages"])
        check_sampler_options(
            sampler.get("name", "ddim"),
            sampler.get("steps", 200),
            sampler.get("eta"),
            sampler.get("spacing"),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"pipeline config: {err}") from None
    for key, choices in (("color_fix", COLOR_FIX_MODES), ("ffn_moe_routing", ROUTING_MODES)):
        if key in cfg and cfg[key] not in choices:
            raise ConfigError(
                f"pipeline config: {key} must be one of {list(choices)}, got {cfg[key]!r}"
            )
    build_schedule(cfg["schedule"])


def load_vae(cfg: Mapping[str, Any], path: str | os.PathLike) -> nn.Module:
    """The FA-VAE of ``cfg`` with weights from a released ``fa_vae.pth`` or our safetensors.

    A plain first stage works too (e.g. LDM's vq-f4 ``model.ckpt`` with ``autoencoder/vq_f4``):
    its decoder ignores the LR features, which is how latents for FA-VAE training are made
    before an FA-VAE exists.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        vae = load_pretrained(path, kinds=("autoencoder",)).eval()
        found = read_pretrained_config(path)["target"]
        if found != cfg.get("target"):  # the file's own (validated) config wins
            logger.warning(
                "%s holds a %r model (the config names %r); using the file's model",
                path, found, cfg.get("target"),
            )  # fmt: skip
        return vae
    state_dict = read_state_dict(path)
    holds = describe_state_dict(state_dict)
    if "encoder.conv_in.weight" not in state_dict:  # a full LDM checkpoint: take the first stage
        inner = {
            k[len("first_stage_model.") :]: v
            for k, v in state_dict.items()
            if k.startswith("first_stage_model.")
        }
        state_dict = inner or state_dict
    # an LDM autoencoder .ckpt also carries its training loss (LPIPS + discriminator): not the model
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    vae = build_uninitialised(cfg, what=str(path))
    try:
        load_state_dict_strict(vae, state_dict, what=str(path))
    except CheckpointMismatchError:
        if holds.startswith(("an FA-VAE", "an autoencoder")):
            raise  # the right kind of file: the key-by-key report helps more
        raise CheckpointError(
            f"{path} holds {holds}, expected the FA-VAE ({cfg.get('target')!r}; --vae-ckpt takes "
            "a released fa_vae.pth or our fa_vae .safetensors): check which file goes to which "
            "option"
        ) from None
    return vae.eval()


def load_experts(
    cfg: Mapping[str, Any],
    paths: Sequence[str | os.PathLike],
    stages: StageSchedule,
    schedule: NoiseSchedule,
    *,
    weights: Weights = "ema",
    schedule_check: OnMismatch = "error",
) -> list[nn.Module]:
    """One UNet per stage, in stage order (see :func:`moe_sr.checkpoints.resolve_expert_order`)."""
    check_experts_fit_stages(paths, stages)
    unets = []
    for k, path in enumerate(resolve_expert_order(paths, stages.num_stages)):
        unet_cfg, shapes = cfg["unet"], None
        if path.suffix == ".safetensors":
            stored = read_expert_metadata(path).get("config")
            if stored is not None:  # the file's own config is data: registered UNets only
                unet_cfg = validate_untrusted(stored, source=str(path), kinds=("unet",))
            shapes = safetensors_shapes(path)
        unet = build_uninitialised(unet_cfg, what=str(path), expect_shapes=shapes)
        info = load_expert(
            path, unet, weights=weights, schedule=schedule, schedule_check=schedule_check
        )
        check_expert_interval(info, k, stages.interval(k))
        unets.append(unet.eval())
        logger.info("stage expert %d (timesteps %s) <- %s", k, stages.interval(k), path)
    return unets


def matching_pipeline_presets(
    boundaries: Sequence[int], unet: Mapping[str, Any] | None
) -> list[str]:
    """Bundled pipeline presets (``configs/*/*.yaml`` with ``unet``, ``vae`` and ``stages``)
    whose stages are ``boundaries`` and, when given, whose UNet config is ``unet``."""
    from ldm.config import CONFIG_ROOT, load_yaml

    found = []
    for path in sorted(CONFIG_ROOT.glob("*/*.yaml")):
        try:
            raw = load_yaml(path)
            if not {"unet", "vae", "stages"} <= set(raw):
                continue
            cfg = to_plain(load_config(path))
        except ConfigError:
            continue
        if list(cfg.get("stages") or []) == list(boundaries) and (
            unet is None or cfg.get("unet") == unet
        ):
            found.append(str(path.relative_to(CONFIG_ROOT).with_suffix("")))
    return found


def check_experts_fit_stages(paths: Sequence[str | os.PathLike], stages: StageSchedule) -> None:
    """Refuse stage experts of our format whose metadata asks for another number of stages than the
    config's, naming the stages (and the bundled preset) their metadata asks for."""
    metas = [read_expert_metadata(p) for p in paths if Path(p).suffix == ".safetensors"]
    metas = [m for m in metas if "t_range" in m and "num_stages" in m]
    if not metas:
        return
    wanted = metas[0]["num_stages"]
    if wanted == stages.num_stages:
        return  # the interval of each stage expert is checked as it loads
    bounds = sorted({b for m in metas for b in m["t_range"]})
    known = f" {bounds}" if len(bounds) == wanted + 1 else ""
    presets = matching_pipeline_presets(bounds, metas[0].get("config")) if known else []
    hint = (
        f"their metadata asks for config {presets[0]!r}: pass --config {presets[0]}"
        if presets
        else "pass the pipeline config they were trained with (--config)"
    )
    raise ConfigError(
        f"the expert files are {wanted} stages{known}, the pipeline config has "
        f"{stages.num_stages} stages {list(stages.boundaries)}; {hint}"
    )


def pipeline_from_parts(
    cfg: Mapping[str, Any],
    unets: Sequence[nn.Module],
    vae: nn.Module,
    **kwargs: Any,
) -> MoESRPipeline:
    """A pipeline from built modules, with the config's schedule, stages and defaults."""
    sampler = dict(cfg.get("sampler") or {})
    defaults: dict[str, Any] = {
        "sampler": sampler.get("name", "ddim"),
        "spacing": sampler.get("spacing"),
        "restart_at_stages": sampler.get("restart_at_stages", False),
        "steps": sampler.get("steps", 200),
        "eta": sampler.get("eta", 1.0),
        "seed": sampler.get("seed", 42),
        "color_fix": cfg.get("color_fix", "adain"),
        "ffn_moe_routing": cfg.get("ffn_moe_routing", "random"),
        "tiling": TilingConfig(**dict(cfg.get("tiling") or {})),
    }
    defaults.update({k: v for k, v in kwargs.items() if v is not None})
    return MoESRPipeline(
        unets,
        StageSchedule(cfg["stages"]),
        build_schedule(cfg["schedule"]),
        vae,
        **defaults,
    )


def build_pipeline(
    config: str | os.PathLike | Mapping[str, Any] = DEFAULT_CONFIG,
    experts: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    *,
    overrides: Iterable[str] = (),
    weights: Weights = "ema",
    schedule_check: OnMismatch = "error",
    **pipeline_kwargs: Any,
) -> MoESRPipeline:
    """Config + stage expert checkpoints (released ``.ckpt`` or our ``.safetensors``) + FA-VAE
    weights.

    ``pipeline_kwargs`` go to :class:`MoESRPipeline` (``device``, ``dtype``, ``vae_dtype``,
    ``offload``, ``sampler``, ``spacing``, ``steps``, ``eta``, ``seed``, ``color_fix``,
    ``ffn_moe_routing``, ``tiling``); ``None`` values keep the config's defaults.
    """
    cfg = load_pipeline_config(config, overrides)
    if vae is None:
        raise ValueError("give the FA-VAE weights (released fa_vae.pth or our .safetensors)")
    stages = StageSchedule(cfg["stages"])
    schedule = build_schedule(cfg["schedule"])
    unets = load_experts(
        cfg, experts, stages, schedule, weights=weights, schedule_check=schedule_check
    )
    pipe = pipeline_from_parts(cfg, unets, load_vae(cfg["vae"], vae), **pipeline_kwargs)
    pipe.config = cfg
    return pipe


def find_folder_files(folder: str | os.PathLike) -> tuple[list[Path], Path]:
    """Stage expert files (with stage metadata) and the one FA-VAE file in a folder of ours."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    experts, others = [], []
    for p in sorted(folder.glob("*.safetensors")):
        (experts if "stage" in read_expert_metadata(p) else others).append(p)
    if not experts:
        raise FileNotFoundError(
            f"{folder} holds no stage expert .safetensors with stage metadata (write them with "
            "moe_sr.build.export_pipeline or moe_sr.checkpoints.save_expert)"
        )
    # the autoencoder: the one other file of ours (an FA-VAE preferred over a plain VQ model)
    targets = {p: str(read_pretrained_config(p).get("target", "")) for p in others}
    vaes = [p for p in others if "fa_vae" in targets[p]] or others
    if len(vaes) != 1:
        raise FileNotFoundError(
            f"{folder} must hold exactly one autoencoder .safetensors (the FA-VAE) next to the "
            f"stage experts, found {[p.name for p in vaes]}"
        )
    return experts, vaes[0]


def build_pipeline_from_folder(
    folder: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] = DEFAULT_CONFIG,
    **kwargs: Any,
) -> MoESRPipeline:
    """A pipeline from a folder of our safetensors (stage experts ordered by their metadata)."""
    experts, vae = find_folder_files(folder)
    return build_pipeline(config, experts, vae, **kwargs)


def export_pipeline(pipe: MoESRPipeline, folder: str | os.PathLike) -> list[Path]:
    """Write ``expert_stage{k}.safetensors`` and ``fa_vae.safetensors`` (weights + configs).

    Needs ``pipe.config`` (set by :func:`build_pipeline`) for the UNet and VAE configs.
    """
    from ldm.checkpoint import save_pretrained

    cfg = getattr(pipe, "config", None)
    if cfg is None:
        raise ValueError("export_pipeline needs a pipeline made by build_pipeline (with .config)")
    folder = Path(folder)
    out = []
    for k, unet in enumerate(pipe.unets):
        out.append(
            save_expert(
                unet.float(),
                folder / f"expert_stage{k}.safetensors",
                config=cfg["unet"],
                stage=k,
                num_stages=pipe.stages.num_stages,
                t_range=pipe.stages.interval(k),
            )
        )
        unet.to(pipe.dtype)
    out.append(save_pretrained(pipe.vae.float(), folder / "fa_vae.safetensors", cfg["vae"]))
    pipe.vae.to(pipe.vae_dtype)
    return out
