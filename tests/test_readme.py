"""The README's examples name the versions the build produces (a new user copies them)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_greengrass_examples_use_the_built_versions():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    runtime = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    model = json.loads((REPO / "edge_runtime/models/pneumonia-cxr/manifest.json").read_text())["version"]
    merges = re.findall(r'--merge "([\w.]+)=([\d.]+)"', readme)
    assert merges, "the README has no greengrass-cli --merge example"
    expected = {"com.healthdiag.EdgeInference": runtime, "com.healthdiag.model.PneumoniaCXR": model}
    for component, version in merges:
        assert version == expected[component], (
            f"README deploys {component}={version}, the build makes {expected[component]}"
        )


def test_setup_commands_work_with_and_without_sudo():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = readme[readme.index("## Quick start") : readme.index("## What it does")]
    commands = [line for line in quick_start.splitlines() if "apt-get" in line]
    assert len(commands) == 2
    for command in commands:
        assert "sudo apt-get" not in command.replace("$(command -v sudo) apt-get", "")
