"""YAML configs: loading, composing, command-line overrides, instantiation.

Configs follow latent-diffusion's ``target`` + ``params`` convention::

    model:
      target: vq_f4            # a registered short name or a dotted import path
      params: {embed_dim: 3, ...}

Several YAML files merge left to right, then ``key=value`` dotlist overrides
apply (``trainer.max_steps=10``). ``${...}`` interpolation composes presets
instead of copying them; ``${preset:autoencoder/vq_f4}`` pulls in another file
under ``configs/``. Unknown targets and unknown parameter names fail with the
list of valid ones.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.registry import lookup

#: Folder of the bundled YAML presets (``configs/`` at the repository root).
CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be loaded or instantiated as written."""


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A path as given, or a preset name relative to ``configs/`` (``.yaml`` optional)."""
    p = Path(path)
    candidates = [
        p,
        p.with_suffix(".yaml"),
        CONFIG_ROOT / p,
        (CONFIG_ROOT / p).with_suffix(".yaml"),
    ]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(
        f"config {str(path)!r} not found (looked for it as a file and under {CONFIG_ROOT}); "
        "give a YAML path or a preset name such as 'autoencoder/vq_f4'"
    )


def _load_preset(name: str, key: str | None = None) -> Any:
    """``${preset:NAME}`` -> the whole preset; ``${preset:NAME,KEY}`` -> its sub-tree ``KEY``
    (dotted, e.g. ``params.ddconfig``), to compose a preset from parts of another."""
    cfg = load_yaml(resolve_config_path(name))
    if key is not None:
        node = OmegaConf.select(cfg, str(key), default=_MISSING)
        if node is _MISSING:
            raise ConfigError(f"preset {name!r} has no key {key!r}")
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    return OmegaConf.to_container(cfg, resolve=True)


_MISSING = object()


if not OmegaConf.has_resolver("preset"):
    # omegaconf >= 2.4 renamed register_new_resolver to register_resolver
    _register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    _register("preset", _load_preset)


def load_yaml(path: str | os.PathLike) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml errors carry line numbers; keep them
        raise ConfigError(f"cannot parse config {path}: {err}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return cfg


def load_config(
    *paths: str | os.PathLike, overrides: Iterable[str] = (), resolve: bool = True
) -> DictConfig:
    """Merge YAML files left to right, apply ``key=value`` overrides, resolve."""
    cfgs = [load_yaml(resolve_config_path(p)) for p in paths]
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got {bad}")
    if overrides:
        cfgs.append(OmegaConf.from_dotlist(overrides))
    cfg = OmegaConf.merge(*cfgs) if cfgs else OmegaConf.create({})
    if resolve:
        OmegaConf.resolve(cfg)
    return cfg  # type: ignore[return-value]


def to_plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolved); anything else unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def check_params(fn: Any, params: Mapping[str, Any], target: str) -> None:
    """Raise if ``params`` names an argument that ``fn`` does not take."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n != "self"
    ]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {unknown} for target {target!r}; valid parameters: {valid}"
        )
    missing = [
        n
        for n, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n != "self"
        and n not in params
    ]
    if missing:
        raise ConfigError(f"missing required parameter(s) {missing} for target {target!r}")


def instantiate(cfg: Mapping[str, Any] | DictConfig, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target, params}`` mapping.

    Only the keys ``target`` and ``params`` are allowed at this level, so a typo
    such as ``parmas`` fails instead of being ignored.
    """
    cfg = to_plain(cfg)
    if not isinstance(cfg, Mapping) or "target" not in cfg:
        raise ConfigError(f"expected a mapping with a 'target' key, got {cfg!r}")
    unknown = sorted(set(cfg) - {"target", "params"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} next to target {cfg['target']!r}; "
            "only 'target' and 'params' are allowed"
        )
    target = cfg["target"]
    fn = lookup(target)
    params = dict(cfg.get("params") or {})
    params.update(extra)
    check_params(fn, params, target)
    return fn(**params)


def save_resolved_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config into ``run_dir`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / name
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)), resolve=True))
    os.replace(tmp, out)
    return out


def dump(cfg: Any) -> str:
    """The resolved config as YAML text (for ``--dry-run``)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)), resolve=True)
