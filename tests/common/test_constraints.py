"""Installs are reproducible: constraints.txt pins every dependency inside pyproject's ranges, and every install uses it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_is_pinned_inside_its_range():
    """Each runtime and dev requirement of pyproject.toml has a pin in constraints.txt that its range admits."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt (run .ci/refresh-constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside {req.specifier}"
        )


def test_the_readme_and_the_image_install_from_the_constraints():
    """The README's commands (which CI runs) and the Dockerfile pass -c constraints.txt to pip."""
    readme = (ROOT / "README.md").read_text()
    installs = re.findall(r"pip install [^&\n]*", readme)
    assert installs and all("-c constraints.txt" in cmd for cmd in installs), installs
    assert "pip install -c constraints.txt" in (ROOT / "Dockerfile").read_text()
