"""Print pip constraints that pin each dependency to the lower bound pyproject.toml declares (`pkg>=X` -> `pkg==X`).

    python .ci/min_versions.py demo test > constraints.txt    # [project].dependencies and these extras

pyproject.toml stays the one place where minimum versions are written; `.ci/check-min-versions` installs exactly these
pins and runs the core tests. Every requirement of the selected groups needs one `>=` lower bound (or an `==` pin),
so that no declared minimum goes untested.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?P<op>>=|==)\s*(?P<version>[^\s,;]+)\s*"
    r"(?P<marker>;.*)?$"
)


def minimum_pins(project: dict[str, Any], extras: list[str]) -> list[str]:
    """`name==lower_bound` for [project].dependencies and the given optional-dependency groups (deduplicated)."""
    optional = project.get("optional-dependencies", {})
    groups = {"dependencies": project.get("dependencies", [])}
    for extra in extras:
        if extra not in optional:
            raise ValueError(f"extra {extra!r} is not in pyproject.toml; extras are {sorted(optional)}")
        groups[f"extra {extra!r}"] = optional[extra]
    pins: dict[str, str] = {}
    for group, requirements in groups.items():
        for requirement in requirements:
            match = REQUIREMENT.match(requirement)
            if match is None:
                raise ValueError(f"{group}: {requirement!r} must have one `>=` lower bound (or an `==` pin)")
            name = re.sub(r"[-_.]+", "-", match["name"]).lower()
            pin = f"{name}=={match['version']}" + (f" {match['marker']}" if match["marker"] else "")
            if pins.setdefault(name, pin) != pin:
                raise ValueError(f"{name}: two different minimums, {pins[name]!r} and {pin!r}")
    return list(pins.values())


def main(argv: list[str]) -> int:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    try:
        pins = minimum_pins(project, argv)
    except ValueError as e:
        print(f"{PYPROJECT}: {e}", file=sys.stderr)
        return 1
    python = re.fullmatch(r">=\s*(\d+)\.(\d+)", project.get("requires-python", ""))
    if python is None or sys.version_info[:2] != (int(python[1]), int(python[2])):
        print(f"note: requires-python is {project.get('requires-python')!r}; this is Python "
              f"{sys.version_info.major}.{sys.version_info.minor}, so the minimum Python is not what is tested",
              file=sys.stderr)
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
