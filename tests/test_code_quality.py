"""The code stays as the README promises: ruff-clean, ruff-formatted and mypy-clean (the
modules mypy checks are listed in pyproject.toml), its imports inside the layers of
docs/architecture.md (import-linter's contracts in pyproject.toml: no arrow back down the
layers, no import loop inside a package), with the tool versions pinned and the
dependencies installed at the versions constraints.txt records. CI runs only `make test`,
so this is where a regression shows."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from settings import REPO_ROOT

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
        ["lint-imports", "--no-cache"],
    ],
    ids=["ruff-check", "ruff-format", "mypy", "import-layers"],
)
def test_static_checks_pass(command: list[str]) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


# -- dependencies ------------------------------------------------------------------------------
def _declared() -> list[Requirement]:
    """Every requirement of mmrag[stack,dev] as pyproject.toml declares it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    groups = [project["dependencies"], *project["optional-dependencies"].values()]
    return [Requirement(r) for group in groups for r in group]


def _constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_ruff_and_mypy_are_pinned_and_installed_at_the_pin() -> None:
    """The checks above fail on what ruff and mypy find, so a new release of either must
    not change the verdict: pyproject.toml pins them exactly and this venv runs that pin."""
    for tool in ("ruff", "mypy", "import-linter"):
        (req,) = [r for r in _declared() if canonicalize_name(r.name) == tool]
        (spec,) = list(req.specifier)
        assert spec.operator == "==", f"pin {tool} exactly in the dev extra, not {req}"
        assert version(tool) == spec.version, f"{tool} {version(tool)} installed, {req} declared"


def test_constraints_pin_every_dependency_inside_its_declared_range() -> None:
    """constraints.txt (used by `make test` and the image) is the tested point inside
    pyproject.toml's ranges: every declared dependency is pinned, each pin satisfies its
    range, and the install step uses it."""
    pins = _constraints()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared but constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside the declared {req}"
        )
    assert "mmrag" not in pins
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert re.search(r"pip install (--?\S+ )*-c constraints\.txt -e '\.\[stack,dev\]'", makefile)


def test_installed_versions_are_the_pinned_ones() -> None:
    """The venv the suite runs in is the one constraints.txt describes (a hand-installed
    upgrade shows here: regenerate constraints.txt, or reinstall)."""
    drift = []
    for name, pinned in _constraints().items():
        try:
            installed = Version(version(name))
        except PackageNotFoundError:
            continue  # e.g. a CUDA library that a CPU build of torch does not need
        # ==2.14.1 admits a local build such as 2.14.1+cpu.
        if not SpecifierSet(f"=={pinned}").contains(installed, prereleases=True):
            drift.append(f"{name} {installed} (pinned {pinned})")
    assert not drift, "installed versions differ from constraints.txt: " + ", ".join(drift)
