"""Packaging invariants: dependency direction, environment.yaml vs setup.py, entry points."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
#: package -> packages it must never import (DESIGN.md: ldm <- fa_vae <- moe_sr <- scripts)
FORBIDDEN = {
    "ldm": {"fa_vae", "moe_sr", "scripts"},
    "fa_vae": {"moe_sr", "scripts"},
    "moe_sr": {"scripts"},
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                names.add(str(node.args[0].value).split(".")[0])
    return names


def test_no_reverse_imports():
    bad = []
    for pkg, forbidden in FORBIDDEN.items():
        for path in (ROOT / pkg).rglob("*.py"):
            hit = _imported_top_levels(path) & forbidden
            if hit:
                bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, "reverse dependency arrows:\n" + "\n".join(bad)


def _setup_requirements() -> dict[str, str]:
    text = (ROOT / "setup.py").read_text()
    reqs = re.findall(r'"([A-Za-z0-9_.\-]+)(==[^"]+)"', text)
    return {name.lower(): spec for name, spec in reqs}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level packages imported at module level (not inside a function: a lazy import)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            todo += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return names


def test_lightning_only_in_the_training_layer():
    """Lightning is imported only by ldm/training; the CLIs import it lazily (in functions)."""
    bad = []
    for pkg in ("ldm", "fa_vae", "moe_sr"):
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("ldm", "training"):
                continue
            hit = _module_level_imports(path) & {"lightning", "pytorch_lightning"}
            if hit:
                bad.append(f"{rel} imports {sorted(hit)} at module level")
    assert not bad, bad


def test_environment_yaml_matches_setup():
    env = yaml.safe_load((ROOT / "environment.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pinned = {}
    for line in pip_section:
        m = re.match(r"([A-Za-z0-9_.\-]+)(==.+)$", line)
        if m:
            pinned[m.group(1).lower()] = m.group(2)
    setup_pins = _setup_requirements()
    for name, spec in pinned.items():
        if name in setup_pins:
            assert setup_pins[name] == spec, (
                f"{name}: environment.yaml {spec} vs setup.py {setup_pins[name]}"
            )
    assert pinned.get("torch") == "==2.14.1" and pinned.get("torchvision") == "==0.29.1"
    assert any(str(x).startswith("-e .[") for x in pip_section), (
        "environment.yaml must install the package"
    )


def test_console_scripts_resolve():
    from importlib import import_module, metadata

    eps = [
        ep
        for ep in metadata.entry_points(group="console_scripts")
        if ep.value.split(".")[0] in FORBIDDEN
    ]
    assert eps, "no console entry points installed (pip install -e . first)"
    for ep in eps:
        module, _, attr = ep.value.partition(":")
        assert callable(getattr(import_module(module), attr)), ep.value


def test_registry_plugins_import():
    from ldm.registry import REGISTRY

    names = REGISTRY.names()
    assert isinstance(names, list)
