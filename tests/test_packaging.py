"""What the distribution says about itself: its version, license and classifiers."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import metadata, version

import middleware
from tests.servers import ROOT


def test_version_is_the_installed_distributions() -> None:
    assert middleware.__version__ == version("quota-middleware")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert middleware.__version__ == declared
    assert re.fullmatch(r"\d+\.\d+\.\d+([.+-].+)?", middleware.__version__)


def test_license_and_changelog_ship_with_the_source() -> None:
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{middleware.__version__}]" in changelog


def test_installed_metadata_declares_the_license_and_typing() -> None:
    meta = metadata("quota-middleware")
    assert meta["License-Expression"] == "Apache-2.0"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers and "Framework :: AsyncIO" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX expression replaces them
