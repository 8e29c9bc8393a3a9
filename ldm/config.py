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

import collections.abc
import inspect
import os
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.atomic import write_text
from ldm.registry import REGISTRY, RegistryError, lookup
from ldm.safe_text import printable

#: Folder of the bundled YAML presets (``configs/`` at the repository root).
CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be loaded or instantiated as written."""


def one_line_error(err: BaseException) -> str:
    """An OmegaConf / YAML error as one line: its message and the key it happened at (OmegaConf
    appends ``full_key`` and ``object_type`` on lines of their own; YAML the position)."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        what = " ".join(x for x in (err.context, err.problem) if x) or type(err).__name__
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), "")
    head = [
        ln for ln in lines if not ln.startswith(("full_key:", "object_type=", "reference_type="))
    ]
    msg = " ".join(head) or type(err).__name__
    msg = msg.replace("ConfigError raised while resolving interpolation: ", "")
    return f"{msg} (at {key})" if key else msg


def parse_overrides(overrides: Iterable[str], *, what: str = "override") -> DictConfig:
    """``key=value`` strings -> a config (values parsed as YAML); malformed ones give a
    :class:`ConfigError` naming the override."""
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError(f"{what} values must look like key=value, got {bad}")
    out = OmegaConf.create({})
    for o in overrides:
        try:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([o]))
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(
                f"bad {what} {o!r}: {one_line_error(err)}; write key=value with a YAML value "
                "(quote strings that contain ':', '[' or '{')"
            ) from None
    return out  # type: ignore[return-value]


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
    except Exception as err:  # noqa: BLE001 - yaml errors carry line numbers; keep them
        raise ConfigError(f"cannot parse config {path}: {one_line_error(err)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    return cfg


def load_config(
    *paths: str | os.PathLike, overrides: Iterable[str] = (), resolve: bool = True
) -> DictConfig:
    """Merge YAML files left to right, apply ``key=value`` overrides, resolve."""
    cfgs = [load_yaml(resolve_config_path(p)) for p in paths]
    overrides = list(overrides)
    if overrides:
        cfgs.append(parse_overrides(overrides))
    try:
        cfg = OmegaConf.merge(*cfgs) if cfgs else OmegaConf.create({})
        if resolve:
            OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(one_line_error(err)) from None
    return cfg  # type: ignore[return-value]


def resolve_in_place(cfg: DictConfig) -> DictConfig:
    """``OmegaConf.resolve`` with one-line :class:`ConfigError` messages."""
    try:
        OmegaConf.resolve(cfg)
    except (OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(one_line_error(err)) from None
    return cfg


def to_plain(cfg: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (resolved); anything else unchanged."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except (OmegaConfBaseException, yaml.YAMLError) as err:
            raise ConfigError(one_line_error(err)) from None
    return cfg


def _init_signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def check_params(
    fn: Any,
    params: Mapping[str, Any],
    target: str,
    *,
    require_all: bool = True,
    kind: str = "target",
) -> None:
    """Raise if ``params`` names an argument that ``fn`` does not take, misses a required one
    (unless ``require_all`` is false), or gives a value of the wrong type (checked against the
    annotations, see :func:`check_types`)."""
    sig = _init_signature(fn)
    if sig is None:
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        check_types(fn, params, target, kind=kind)
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
            f"unknown parameter(s) {unknown} for {kind} {target!r}; valid parameters: {valid}"
        )
    missing = [
        n
        for n, p in sig.parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n != "self"
        and n not in params
    ]
    if missing and require_all:
        raise ConfigError(f"missing required parameter(s) {missing} for {kind} {target!r}")
    check_types(fn, params, target, kind=kind)


def _type_hints(fn: Any) -> dict[str, Any]:
    """Resolved annotations of ``fn`` (a class: its ``__init__``); ``{}`` when they cannot be
    resolved (then nothing is checked)."""
    obj = fn.__init__ if inspect.isclass(fn) else fn
    try:
        return typing.get_type_hints(obj)
    except Exception:  # noqa: BLE001 - names only importable under TYPE_CHECKING etc.
        return {}


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


_SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)
_MAPPING_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def value_matches(value: Any, hint: Any) -> bool:
    """Whether a config value (plain YAML/JSON data) fits the annotation ``hint``.

    Understands the annotations our constructors use: ``bool``, ``int``, ``float`` (an int is
    accepted), ``str``, ``None``, unions / ``Optional``, ``Literal``, sequences (a list or a
    tuple; ``tuple[int, int]`` checks the length) and mappings. Anything else (``Any``, a class
    such as ``torch.device``) is accepted: it cannot be judged from plain data.
    """
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in _SEQUENCE_ORIGINS or origin in _SEQUENCE_ORIGINS:
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(map(value_matches, value, args))
        item = args[0] if args else Any
        return all(value_matches(v, item) for v in value)
    if hint in _MAPPING_ORIGINS or origin in _MAPPING_ORIGINS:
        if not isinstance(value, Mapping):
            return False
        if len(args) == 2:
            return all(
                value_matches(k, args[0]) and value_matches(v, args[1]) for k, v in value.items()
            )
        return True
    return True


def check_types(fn: Any, params: Mapping[str, Any], target: str, *, kind: str = "target") -> None:
    """Raise :class:`ConfigError` naming the key when a parameter value has the wrong type
    (``ema_decay: fast`` for a float), as far as the annotations say (:func:`value_matches`)."""
    hints = _type_hints(fn)
    for name, value in params.items():
        value = to_plain(value)
        if name in hints and not value_matches(value, hints[name]):
            raise ConfigError(
                f"parameter {name!r} of {kind} {target!r} must be {_type_name(hints[name])}, "
                f"got {value!r} ({type(value).__name__})"
            )


#: Value types a config read from a file may hold (what JSON can express).
_PLAIN_SCALARS = (str, int, float, bool, type(None))


def validate_untrusted(
    cfg: Any, *, source: str, kinds: Collection[str] | None = None
) -> dict[str, Any]:
    """Check a ``{target, params}`` config that comes from a file (weights metadata, a
    downloaded config) before anything of it is built; return it as a plain dict.

    Such a config is data, never code: its target must be a registered short name (never a
    dotted import path: nothing is imported) of one of ``kinds`` (e.g. ``{"autoencoder"}``),
    its parameter names and types must fit the target's signature, nested ``{target, ...}``
    mappings obey the same rules, and no string may hold a ``${...}`` interpolation. Raises
    :class:`ConfigError` naming ``source``.
    """
    if isinstance(cfg, (DictConfig, ListConfig)):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(cfg, Mapping) or not isinstance(cfg.get("target"), str):
        raise ConfigError(f"{source}: the stored config is not a {{target, params}} mapping")
    target = cfg["target"]
    if kinds is not None:
        kind = REGISTRY.kind_of(target) if REGISTRY.is_registered(target) else None
        if kind not in kinds:
            if REGISTRY.is_registered(target):
                article = "an" if kind and kind[0] in "aeio" else "a"  # "a unet"
                what = f"{article} {kind} ({target!r})" if kind else f"a {target!r} object"
            else:
                what = f"target {target!r}, which is not a registered network"
            valid = sorted(n for n in REGISTRY.names() if REGISTRY.kind_of(n) in kinds)
            raise ConfigError(
                f"{source} holds {what}, expected {' or '.join(sorted(kinds))} "
                f"({', '.join(valid)}): check which file goes to which option; a weight "
                "file's config may only name registered networks, never an import path"
            )
    try:
        _check_untrusted_node(cfg, "config")
    except (ConfigError, RegistryError) as err:
        raise ConfigError(f"{source}: refusing its stored config: {err}") from None
    return dict(cfg)


def _check_untrusted_node(node: Any, where: str) -> None:
    if isinstance(node, str):
        if "${" in node:
            raise ConfigError(f"{where}: interpolations (${{...}}) are not allowed: {node!r}")
        return
    if isinstance(node, _PLAIN_SCALARS):
        return
    if isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_untrusted_node(v, f"{where}[{i}]")
        return
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: unsupported value of type {type(node).__name__}")
    for k in node:
        if not isinstance(k, str):
            raise ConfigError(f"{where}: keys must be strings, got {k!r}")
        _check_untrusted_node(k, f"{where} key")
    if "target" not in node:
        for k, v in node.items():
            _check_untrusted_node(v, f"{where}.{printable(k, 60)}")
        return
    unknown = sorted(set(node) - {"target", "params"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} next to 'target'")
    fn = REGISTRY.lookup(node["target"], allow_import=False)
    params = node.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params must be a mapping, got {type(params).__name__}")
    for k, v in params.items():
        _check_untrusted_node(v, f"{where}.params.{printable(k, 60)}")
    check_params(fn, params, node["target"])


def instantiate(
    cfg: Mapping[str, Any] | DictConfig,
    *,
    trusted: bool = True,
    source: str = "config",
    kinds: Collection[str] | None = None,
    **extra: Any,
) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target, params}`` mapping.

    Only the keys ``target`` and ``params`` are allowed at this level, so a typo
    such as ``parmas`` fails instead of being ignored. ``trusted=False`` is for configs that
    come from files (weights metadata, downloads): they go through
    :func:`validate_untrusted` first (registered targets of ``kinds`` only, no imports).
    """
    if not trusted:
        cfg = validate_untrusted(cfg, source=source, kinds=kinds)
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
    try:
        fn = lookup(target, allow_import=trusted)
    except RegistryError as err:
        raise ConfigError(str(err)) from None
    params = cfg.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"params of target {target!r} must be a mapping, got {params!r}")
    params = dict(params)
    params.update(extra)
    check_params(fn, params, target)
    return fn(**params)


def check_config_tree(node: Any, where: str = "config") -> None:
    """Check every ``{target, params}`` mapping inside ``node`` (a trusted config) without
    building anything: the target exists (a dotted path is imported, as building would), the
    parameter names and value types fit its signature. For ``--dry-run`` and before a run
    folder is made. Raises :class:`ConfigError` naming the key."""
    node = to_plain(node)
    if isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_config_tree(v, f"{where}[{i}]")
        return
    if not isinstance(node, Mapping):
        return
    if isinstance(node.get("target"), str) and set(node) <= {"target", "params"}:
        target = node["target"]
        try:
            fn = lookup(target, allow_import=True)
        except RegistryError as err:
            raise ConfigError(f"{where}: {err}") from None
        params = node.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{where}.params must be a mapping, got {params!r}")
        try:
            check_params(fn, params, target, require_all=False)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        for k, v in params.items():
            check_config_tree(v, f"{where}.params.{k}")
        return
    for k, v in node.items():
        check_config_tree(v, f"{where}.{k}")


def save_resolved_config(cfg: Any, run_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the fully resolved config into ``run_dir`` (atomically) and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return write_text(
        run_dir / name, OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)), resolve=True)
    )


def dump(cfg: Any) -> str:
    """The resolved config as YAML text (for ``--dry-run``)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)), resolve=True)
