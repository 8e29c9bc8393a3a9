"""Short names for the classes and functions that configs can instantiate.

A config names what to build with ``target``: either a registered short name
(``vq_f4``, ``unet``, ``fa_vae_vq_f4`` ...) or a dotted import path
(``my_package.models.MyNet``) for user extensions.

Packages register their classes with the :func:`register` decorator. So that a
short name is found without the caller importing the defining module first,
every installed package lists its registering modules under the entry-point
group ``moe_sr.registry`` (see ``setup.py``); :func:`lookup` imports them on the
first miss. This keeps the dependency direction ``ldm <- fa_vae <- moe_sr``:
``ldm`` never imports the packages built on top of it.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "moe_sr.registry"

T = TypeVar("T")


class RegistryError(KeyError):
    """Unknown target name or a name registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


class Registry:
    """A name -> object table with readable errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Any] = {}
        self._kinds: dict[str, str] = {}
        self._priority: dict[str, int] = {}
        self._plugins_loaded = False

    def register(
        self, name: str | None = None, *, kind: str | None = None, priority: int = 0
    ) -> Callable[[T], T]:
        """Decorator: ``@register("vq_f4")`` over a class or factory function.

        ``kind`` tags networks that weight files may rebuild (``"autoencoder"``, ``"unet"``):
        a loader names the kinds it expects and refuses a file whose config holds another.
        ``priority`` orders :meth:`values` where the order matters (higher first), e.g. a more
        specific preset guesser before a general one.
        """

        def decorator(obj: T) -> T:
            key = name or obj.__name__  # type: ignore[attr-defined]
            existing = self._table.get(key)
            if existing is not None and existing is not obj:
                same_def = getattr(existing, "__qualname__", None) == getattr(
                    obj, "__qualname__", None
                ) and getattr(existing, "__module__", None) == getattr(obj, "__module__", None)
                if not same_def:  # re-import of the same module is harmless
                    raise RegistryError(
                        f"{self.kind} name {key!r} is already registered to "
                        f"{existing.__module__}.{existing.__qualname__}; pick another name"
                    )
            self._table[key] = obj
            if kind is not None:
                self._kinds[key] = kind
            self._priority[key] = priority
            return obj

        return decorator

    def load_plugins(self) -> None:
        """Import every module listed under the ``moe_sr.registry`` entry points."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value)

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._table)

    def values(self) -> list[Any]:
        """The registered objects, highest ``priority`` first, then in registration order."""
        self.load_plugins()
        names = sorted(self._table, key=lambda n: -self._priority.get(n, 0))  # stable sort
        return [self._table[n] for n in names]

    def kind_of(self, name: str) -> str | None:
        """The ``kind`` a registered name was tagged with (``None`` when untagged or unknown)."""
        self.load_plugins()
        return self._kinds.get(name)

    def is_registered(self, name: str) -> bool:
        self.load_plugins()
        return name in self._table

    def lookup(self, target: str, *, allow_import: bool = True) -> Any:
        """Return the object for a short name or a dotted path ``pkg.module.Name``.

        ``allow_import=False`` (configs that come from files: weight metadata, downloads)
        accepts registered short names only and never imports anything.
        """
        if not isinstance(target, str):
            raise RegistryError(f"a target must be a string, got {type(target).__name__}")
        if target in self._table:
            return self._table[target]
        self.load_plugins()
        if target in self._table:
            return self._table[target]
        if not allow_import:
            raise RegistryError(
                f"target {target!r} is not a registered {self.kind} name; a config read from a "
                "file (weights metadata, a download) may only name registered targets "
                f"({', '.join(sorted(self._table))}). Dotted import paths are allowed only in "
                "configs you pass yourself"
            )
        if "." in target:
            module_name, _, attr = target.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise RegistryError(
                    f"cannot import module {module_name!r} for target {target!r}: {err}"
                ) from err
            if not hasattr(module, attr):
                raise RegistryError(f"module {module_name!r} has no attribute {attr!r}")
            return getattr(module, attr)
        close = difflib.get_close_matches(target, self._table, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} target {target!r}.{hint} Registered names: "
            f"{', '.join(sorted(self._table))}. A dotted import path (pkg.module.Name) "
            "also works for your own classes."
        )


#: The one table every config ``target`` is looked up in.
REGISTRY = Registry("config")
register = REGISTRY.register
lookup = REGISTRY.lookup
