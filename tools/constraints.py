"""Write constraints.txt: the exact installed versions of every package pyproject.toml names.

    python tools/constraints.py > constraints.txt      (run with the venv the docs' numbers come from)

Only direct dependencies (runtime and every extra) are pinned; packages of an extra that is not
installed are listed in a comment, unpinned. ``make install`` installs with ``-c constraints.txt``.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def declared() -> list[str]:
    """Distribution names in pyproject.toml (runtime first, then extras), self-references dropped."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    names = [re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0] for spec in specs]
    out: list[str] = []
    for name in names:
        if name != project["name"] and name.lower() not in (n.lower() for n in out):
            out.append(name)
    return out


def main() -> None:
    pinned, missing = [], []
    for name in declared():
        try:
            pinned.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            missing.append(name)
    lines = [
        "# Exact versions of moleflow's direct dependencies in the environment the docs' numbers were made with.",
        f"# Python {sys.version.split()[0]}. Regenerate: python tools/constraints.py > constraints.txt",
        *sorted(pinned, key=str.lower),
    ]
    if missing:
        lines.append(f"# not installed there, so not pinned: {', '.join(missing)}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
