"""A training run from YAML configs: run folder, logging, checkpoints, resume, DDP.

The conventions of latent-diffusion's ``main.py`` on Lightning 2.x:

* a new run lives in ``<logdir>/<time>_<name>/`` with ``checkpoints/`` (``last.ckpt`` and the
  best one by the monitored loss), ``configs/`` (the resolved config of every (re)start),
  ``images/`` (LR / sample / HR grids), ``tensorboard/`` and ``csv/`` logs;
* ``resume`` takes a run folder (continues from ``checkpoints/last.ckpt``) or a ``.ckpt`` inside
  one; the run's saved configs are merged first, then the given ones and the overrides;
* the learning rate is ``accumulate_grad_batches * devices * num_nodes * batch_size *
  base_learning_rate`` (LDM's scaling, logged at start) unless ``lightning.scale_lr`` is false.

Config layout::

    model: {target, params}          # the LightningModule (e.g. diffusion_sr)
    data: {batch_size, num_workers, train: {target, params}, validation: ...}
    lightning:
      trainer: {max_steps, accelerator, devices, num_nodes, strategy, precision, ...}
      scale_lr: true
      loggers: [tensorboard, csv]
      checkpoint: {every_n_train_steps, monitor, save_top_k}
      image_logger: {every_n_steps, max_images, log_first_step}    # null: off
      callbacks: {name: {target, params}}                          # extra callbacks
    trainer: {...}                   # optional shorthand, merged over lightning.trainer

Multi-GPU / multi-node: ``trainer.devices``, ``trainer.num_nodes`` and ``trainer.strategy: ddp``.
The run folder name is passed to the DDP worker processes through ``MOESR_RUN_DIR`` (set it
yourself on every node of a multi-node job so that all nodes write to the same folder).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.config import (
    ConfigError,
    dump,
    instantiate,
    load_config,
    one_line_error,
    parse_overrides,
    resolve_in_place,
    save_resolved_config,
    to_plain,
)

logger = logging.getLogger(__name__)

RUN_DIR_ENV = "MOESR_RUN_DIR"
#: ``stage`` / ``stages``: variables of the stage-expert configs (interpolated into the model).
KNOWN_SECTIONS = {"model", "data", "lightning", "trainer", "stage", "stages"}
KNOWN_LIGHTNING = {
    "trainer",
    "scale_lr",
    "loggers",
    "checkpoint",
    "image_logger",
    "callbacks",
    "replica_digest",
}


@dataclass
class RunPaths:
    run_dir: Path
    name: str
    now: str
    resume_ckpt: Path | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def cfg_dir(self) -> Path:
        return self.run_dir / "configs"

    @property
    def image_dir(self) -> Path:
        return self.run_dir / "images"


def resolve_resume(resume: str | os.PathLike) -> tuple[Path, Path]:
    """``(run_dir, ckpt)`` from a run folder or a checkpoint path inside ``<run>/checkpoints/``."""
    p = Path(resume)
    if p.is_file():
        if p.parent.name != "checkpoints":
            raise ConfigError(
                f"cannot resume from {p}: a checkpoint must lie in <run>/checkpoints/ so that the "
                "run folder (configs, logs) is known"
            )
        return p.parent.parent, p
    if p.is_dir():
        ckpt = p / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"cannot resume from {p}: {ckpt} does not exist")
        return p, ckpt
    raise ConfigError(f"cannot resume from {p}: no such run folder or checkpoint")


def make_run_paths(
    bases: Sequence[str], *, logdir: str | os.PathLike, name: str | None, resume: str | None
) -> RunPaths:
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    if resume:
        run_dir, ckpt = resolve_resume(resume)
        run_name = run_dir.name.split("_", 1)[1] if "_" in run_dir.name else run_dir.name
        return RunPaths(run_dir=run_dir, name=run_name, now=now, resume_ckpt=ckpt)
    env = os.environ.get(RUN_DIR_ENV)
    if env:  # a DDP worker (or a user pinning the folder on every node)
        run_dir = Path(env)
        return RunPaths(run_dir=run_dir, name=run_dir.name.split("_", 1)[-1], now=now)
    if name is None:
        if not bases:
            raise ConfigError("give at least one --base config or a --name")
        name = Path(bases[0]).stem
    return RunPaths(run_dir=Path(logdir) / f"{now}_{name}", name=name, now=now)


def expand_includes(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """``path`` preceded by the files its top-level ``include:`` names (recursively).

    ``include: train/sr8x_unet`` (or a list) lets a config extend another one instead of
    copying it; the including file's values win.
    """
    from ldm.config import load_yaml, resolve_config_path

    resolved = str(resolve_config_path(path))
    if resolved in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join((*_seen, resolved))}")
    inc = load_yaml(resolved).get("include")
    if inc is None:
        return [resolved]
    incs = [inc] if isinstance(inc, str) else list(inc)
    out: list[str] = []
    for i in incs:
        out += expand_includes(str(i), (*_seen, resolved))
    return out + [resolved]


def compose_config(
    bases: Sequence[str], overrides: Sequence[str], paths: RunPaths | None = None
) -> DictConfig:
    """Saved configs of a resumed run, then ``bases``, then the dotlist ``overrides``.

    ``key=value`` merges into the config (a mapping value merges key by key);
    ``key:=value`` replaces the node at ``key`` as a whole (e.g. swap ``data.train`` for
    another dataset without inheriting its parameters).
    """
    files: list[str] = []
    if paths is not None and paths.resume_ckpt is not None and paths.cfg_dir.is_dir():
        files += [str(p) for p in sorted(paths.cfg_dir.glob("*.yaml"))]
    for b in bases:
        files += expand_includes(b)
    if not files:
        raise ConfigError("no config given: pass --base configs/train/<name>.yaml")
    merge = [o for o in overrides if ":=" not in o.split("=", 1)[0] + "="]
    replace = [o for o in overrides if o not in merge]
    cfg = load_config(*files, overrides=merge, resolve=False)
    for o in replace:  # key:=value replaces the node instead of merging into it
        key, value = o.split(":=", 1)
        new = parse_overrides([f"v={value}"], what=f"override {key.strip()}:=")["v"]
        try:
            OmegaConf.update(cfg, key.strip(), new, merge=False, force_add=True)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"bad override {o!r}: {one_line_error(err)}") from None
    resolve_in_place(cfg)
    cfg.pop("include", None)
    unknown = sorted(set(cfg) - KNOWN_SECTIONS)
    if unknown:
        raise ConfigError(
            f"unknown top-level config section(s) {unknown}; valid: {sorted(KNOWN_SECTIONS)}"
        )
    for key in ("model", "data"):
        if key not in cfg:
            raise ConfigError(f"the training config has no '{key}' section")
    unknown = sorted(set(cfg.get("lightning") or {}) - KNOWN_LIGHTNING)
    if unknown:
        raise ConfigError(f"unknown lightning.* key(s) {unknown}; valid: {sorted(KNOWN_LIGHTNING)}")
    return cfg


def trainer_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    light = to_plain(cfg.get("lightning") or {})
    kw = dict(light.get("trainer") or {})
    kw.update(to_plain(cfg.get("trainer") or {}))
    return kw


def scaled_learning_rate(
    base_lr: float, *, batch_size: int, devices: int, num_nodes: int, accumulate: int
) -> float:
    return accumulate * devices * num_nodes * batch_size * base_lr


def _callbacks(light: Mapping[str, Any], paths: RunPaths, has_val: bool) -> list:
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from ldm.training.callbacks import (
        ImageLogger,
        ReplicaDigest,
        ReseedPerRank,
        SaveLastOnTrainEnd,
    )

    ck = dict(light.get("checkpoint") or {})
    monitor = ck.pop("monitor", None) or ("val/loss_ema" if has_val else "train/loss")
    every = ck.pop("every_n_train_steps", 1000)
    top_k = ck.pop("save_top_k", 1)
    if ck:
        raise ConfigError(
            f"unknown lightning.checkpoint key(s) {sorted(ck)}; valid: monitor, "
            "every_n_train_steps, save_top_k"
        )
    cbs: list = [
        ModelCheckpoint(
            dirpath=str(paths.ckpt_dir),
            filename="best-{step:06d}",
            monitor=monitor,
            mode="min",
            save_top_k=top_k,
            save_last=True,
            every_n_train_steps=None if has_val else every,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # a resumed run overwrites last.ckpt, no last-v1
        ),
        LearningRateMonitor(logging_interval="step"),
        SaveLastOnTrainEnd(paths.ckpt_dir),
        ReseedPerRank(),
    ]
    img = light.get("image_logger", {"every_n_steps": 1000})
    if img:
        cbs.append(ImageLogger(out_dir=paths.image_dir / "train", **img))
    if light.get("replica_digest", False):
        cbs.append(ReplicaDigest(paths.run_dir / "replica_digest"))
    for _, spec in sorted((light.get("callbacks") or {}).items()):
        cbs.append(instantiate(spec))
    return cbs


def run(
    bases: Sequence[str],
    overrides: Sequence[str] = (),
    *,
    resume: str | None = None,
    name: str | None = None,
    seed: int = 23,
    logdir: str | os.PathLike = "logs",
    scale_lr: bool | None = None,
    dry_run: bool = False,
) -> Path | str:
    """Compose the config, build everything and ``fit``. Returns the run folder.

    With ``dry_run`` it returns the resolved config as YAML text and builds nothing.
    """
    from ldm.training.config_check import check_training_config

    paths = make_run_paths(bases, logdir=logdir, name=name, resume=resume)
    cfg = compose_config(bases, overrides, paths)
    check_training_config(cfg)
    if dry_run:
        return dump(cfg)
    if paths.resume_ckpt is not None:
        check_resume_checkpoint(paths.resume_ckpt)
    new_folder = not paths.run_dir.exists()
    try:
        trainer, module, data = _start(cfg, paths, scale_lr=scale_lr, seed=seed)
    except BaseException:
        if new_folder:  # a failed start leaves no (empty) run folder behind
            shutil.rmtree(paths.run_dir, ignore_errors=True)
        raise

    old_env = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(paths.run_dir)  # DDP workers start inside fit()
    try:
        trainer.fit(
            module,
            datamodule=data,
            ckpt_path=str(paths.resume_ckpt) if paths.resume_ckpt else None,
            weights_only=True,
        )
    except BaseException as err:
        if new_folder and trainer.global_step == 0:  # failed before the first step
            shutil.rmtree(paths.run_dir, ignore_errors=True)
        if isinstance(err, SystemExit) and trainer.interrupted:
            raise KeyboardInterrupt from None  # Lightning turns Ctrl-C into exit(1)
        raise
    finally:
        if old_env is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = old_env
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only(logger.info)("run folder: %s", paths.run_dir)
    return paths.run_dir


def check_resume_checkpoint(path: Path) -> None:
    """Read ``path`` the way every loader does (``weights_only``, training objects inert) so
    that a truncated, foreign or malicious ``last.ckpt`` gives the usual one-line
    :class:`~ldm.checkpoint.CheckpointError` before Lightning opens it."""
    from ldm.checkpoint import CheckpointError, load_torch_file

    obj = load_torch_file(path, mmap=zipfile.is_zipfile(path))
    if not isinstance(obj, Mapping) or "state_dict" not in obj or "global_step" not in obj:
        raise CheckpointError(
            f"{path} is not a Lightning training checkpoint (no state_dict / global_step): "
            "resume from a run folder or its checkpoints/last.ckpt"
        )


def _start(cfg: DictConfig, paths: RunPaths, *, scale_lr: bool | None, seed: int):
    """Data, model, resolved-config copy and Trainer of a run (everything before ``fit``)."""
    import lightning as L
    from lightning.pytorch.utilities import rank_zero_only

    import ldm.training.targets  # noqa: F401  (registers the Lightning modules)
    from ldm.training.data import build_datamodule
    from ldm.training.loggers import build_loggers

    L.seed_everything(seed, workers=True)
    light = to_plain(cfg.get("lightning") or {})
    data = build_datamodule(cfg["data"])
    module = instantiate(cfg["model"])

    @rank_zero_only
    def save_configs() -> None:
        save_resolved_config(cfg, paths.cfg_dir, name=f"{paths.now}-project.yaml")

    save_configs()
    kw = trainer_kwargs(cfg)
    kw.setdefault("default_root_dir", str(paths.run_dir))
    trainer = L.Trainer(
        logger=build_loggers(light, paths.run_dir),
        callbacks=_callbacks(light, paths, data.has_validation),
        **kw,
    )

    do_scale = light.get("scale_lr", True) if scale_lr is None else scale_lr
    if hasattr(module, "learning_rate") and "base_learning_rate" in module.hparams:
        base_lr = float(module.hparams.base_learning_rate)
        accumulate = int(kw.get("accumulate_grad_batches", 1))
        devices, nodes = trainer.num_devices, trainer.num_nodes
        if do_scale:
            module.learning_rate = scaled_learning_rate(
                base_lr,
                batch_size=data.batch_size,
                devices=devices,
                num_nodes=nodes,
                accumulate=accumulate,
            )
            rank_zero_only(logger.info)(
                "Setting learning rate to %.2e = %d (accumulate_grad_batches) * %d (devices) * "
                "%d (nodes) * %d (batch size) * %.2e (base_lr)",
                module.learning_rate, accumulate, devices, nodes, data.batch_size, base_lr,
            )  # fmt: skip
        else:
            module.learning_rate = base_lr
            rank_zero_only(logger.info)("Setting learning rate to %.2e (not scaled)", base_lr)
    return trainer, module, data
