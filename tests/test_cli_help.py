"""Every console script: --help works and names each option's default at most once
(issue: moe-sr --help printed "(default: 200) (default: None)")."""

from __future__ import annotations

import importlib
import re
from importlib import metadata

import pytest

SCRIPTS = sorted(
    (ep.name, ep.value)
    for ep in metadata.entry_points(group="console_scripts")
    if ep.value.split(".", 1)[0] in ("ldm", "fa_vae", "moe_sr")
)


def _option_entries(text: str) -> list[str]:
    """The help text of each option (its first line starts with two spaces and a dash)."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            entries.append(line)
        elif entries and line.startswith("    "):
            entries[-1] += " " + line.strip()
        else:
            entries.append("") if line.strip() == "" else None
    return [e for e in entries if e]


def test_the_console_scripts_are_found():
    assert {"moe-sr", "moe-sr-train", "moe-sr-eval", "moe-sr-reconstruct"} <= {
        n for n, _ in SCRIPTS
    }


@pytest.mark.parametrize(("name", "target"), SCRIPTS)
def test_help_names_each_default_once(name, target, capsys):
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    doubled = [e for e in _option_entries(text) if e.lower().count("default") > 1]
    assert not doubled, doubled
