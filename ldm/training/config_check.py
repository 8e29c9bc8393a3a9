"""Checking a composed training config without building anything (``--dry-run``, and every run
before its folder is made): targets exist, parameter names and value types fit.

Each mistake is one :class:`~ldm.config.ConfigError` naming the key, e.g.
``data: parameter 'batch_size' of target 'data' must be int, got 'two' (str)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.config import ConfigError, check_config_tree, check_params, to_plain


def _check_section(fn: Any, values: Any, where: str) -> None:
    if values is None:
        return
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    check_params(fn, values, where, require_all=False, kind="section")


def _checkpoint_options(every_n_train_steps: int = 1000, monitor: str | None = None,
                        save_top_k: int = 1) -> None:  # fmt: skip
    """The signature ``lightning.checkpoint`` is checked against."""


def check_training_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` at the first key of ``cfg`` (a composed training config)
    that cannot work: an unknown target, an unknown parameter, a value of the wrong type."""
    import lightning as L

    import ldm.training.targets  # noqa: F401  (registers the Lightning modules)
    from ldm.training.callbacks import ImageLogger
    from ldm.training.data import DataModuleFromConfig
    from ldm.training.loggers import LOGGER_NAMES

    cfg = to_plain(cfg)
    check_config_tree(cfg["model"], "model")

    data = cfg["data"]
    _check_section(DataModuleFromConfig, data, "data")
    for key in ("train", "validation"):
        if data.get(key) is not None:
            check_config_tree(data[key], f"data.{key}")

    light = cfg.get("lightning") or {}
    trainer = dict(light.get("trainer") or {})
    trainer.update(cfg.get("trainer") or {})
    _check_section(L.Trainer, trainer, "lightning.trainer")
    _check_section(_checkpoint_options, light.get("checkpoint"), "lightning.checkpoint")
    img = light.get("image_logger", None)
    if img:
        _check_section(ImageLogger, img, "lightning.image_logger")
    loggers = light.get("loggers", list(LOGGER_NAMES))
    if not isinstance(loggers, list) or any(n not in LOGGER_NAMES for n in loggers):
        raise ConfigError(
            f"lightning.loggers must be a list of {', '.join(LOGGER_NAMES)}, got {loggers!r}"
        )
    for name, spec in (light.get("callbacks") or {}).items():
        if not isinstance(spec, Mapping) or "target" not in spec:
            raise ConfigError(f"lightning.callbacks.{name} must be a {{target, params}} mapping")
        check_config_tree(spec, f"lightning.callbacks.{name}")
    if not isinstance(light.get("scale_lr", True), bool):
        raise ConfigError(f"lightning.scale_lr must be true or false, got {light['scale_lr']!r}")
