"""The build and release commands as a new user meets them (issue #22).

* Each command's imports are covered by the install line the manuals give for it (parsed with
  ``ast``, mapped to distributions with ``importlib.metadata``, resolved through pyproject's extras
  and the installed packages' own requirements).
* ``--platform manylinux_2_28_aarch64`` reaches pip with the older manylinux tags it covers, and a
  real ARM build (``slow``: it downloads the aarch64 wheels from PyPI) finds every dependency.
* The build prints exactly the ``greengrass-cli deployment create`` command of docs/greengrass.md.
* ``python -m cdk.app`` (what ``npx cdk synth`` runs) synthesizes without touching deprecated
  aws-cdk-lib APIs and without jsii's Node.js banner printed as byte strings.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from helpers import PYPROJECT, installable, make_tiny_bundle, third_party_imports
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from components import build

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"

#: The manuals the commands are shown in (the README links them).
GREENGRASS_MANUAL = REPO_ROOT / "docs" / "greengrass.md"
CLOUD_MANUAL = REPO_ROOT / "docs" / "cloud.md"
AZURE_MANUAL = REPO_ROOT / "docs" / "azure-iot-edge.md"

#: command -> (manual and section that give its install line, the modules it runs).
COMMANDS = {
    "python -m components.build": (
        (GREENGRASS_MANUAL, "## Build and deploy the components"),
        ["components/build.py", "components/validate.py"],
    ),
    "python -m components.azure": (
        (AZURE_MANUAL, "## Build and push the images"),
        ["components/azure/__main__.py"],
    ),
    "python -m cdk.release": ((CLOUD_MANUAL, "## Stacks and the release command"), ["cdk/release.py"]),
    "npx cdk synth": ((CLOUD_MANUAL, "## Stacks and the release command"), ["cdk/app.py"]),
}


# --------------------------------------------------------------------------------------------------
# Dependencies: each command's install line covers its imports


def readme_section(where: tuple[Path, str]) -> str:
    """A manual's section: from its heading to the next of the same level."""
    manual, heading = where
    text = manual.read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def readme_extras(where: tuple[Path, str], command: str) -> set[str]:
    """The extras of the ``pip install -e '.[...]'`` line in the manual section that runs ``command``."""
    section = readme_section(where)
    assert command in section, f"section {where} does not show {command!r}"
    installs = re.findall(r"pip install (?:-e )?'\.\[([\w,-]+)\]'", section)
    assert len(installs) == 1, f"section {where} should give one install line, has {installs}"
    return set(installs[0].split(","))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_readme_install_line_covers_the_command_imports(command: str) -> None:
    heading, entry_points = COMMANDS[command]
    extras = readme_extras(heading, command)
    assert "dev" not in extras, f"{command} must not need the test tools (the dev extra)"
    available = installable(extras)
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(third_party_imports(entry_points).items()):
        provided_by = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert provided_by, f"{where} imports {module}, which no installed distribution provides"
        if not provided_by & available:
            missing.append(f"{module} ({', '.join(sorted(provided_by))}, imported by {where})")
    assert not missing, f"pip install '.[{','.join(sorted(extras))}]' lacks, for {command}: {missing}"


def test_the_import_walk_finds_what_the_commands_import() -> None:
    """The walk itself: local imports are followed (components.build -> validate -> semantic_version)."""
    build_imports = third_party_imports(["components/build.py"])
    assert build_imports["semantic_version"] == "components/validate.py"
    assert {"jsonschema", "yaml"} <= set(build_imports)
    release_imports = third_party_imports(["cdk/release.py"])
    assert {"boto3", "botocore", "semantic_version", "pydantic"} <= set(release_imports)
    assert "aws_cdk" in third_party_imports(["cdk/app.py"])
    assert not {"os", "edge_runtime", "components", "cdk"} & set(release_imports)


# --------------------------------------------------------------------------------------------------
# --platform: pip gets the older manylinux tags a device's glibc also runs


def test_manylinux_2_28_aarch64_reaches_manylinux2014() -> None:
    tags = build.pip_platform_tags(["manylinux_2_28_aarch64"])
    assert tags[0] == "manylinux_2_28_aarch64"
    assert tags[-2:] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert tags[:-1] == [f"manylinux_2_{minor}_aarch64" for minor in range(28, 16, -1)]


def test_x86_64_goes_down_to_manylinux1_and_other_tags_pass_through() -> None:
    tags = build.pip_platform_tags(["manylinux_2_17_x86_64", "manylinux2014_x86_64", "macosx_11_0_arm64"])
    assert tags[:2] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    assert {
        "manylinux_2_12_x86_64",
        "manylinux2010_x86_64",
        "manylinux_2_5_x86_64",
        "manylinux1_x86_64",
    } < set(tags)
    assert tags[-1] == "macosx_11_0_arm64"
    assert len(tags) == len(set(tags)), "a tag given twice reaches pip once"


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/watchdog/", timeout=10) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.slow
def test_arm_build_from_the_readme_finds_every_dependency(tmp_path: Path) -> None:
    """The README's ARM build, for real: pip downloads the aarch64 wheels (about 120 MB) from PyPI."""
    if not _pypi_reachable():
        pytest.skip("PyPI (https://pypi.org) is not reachable: the ARM build downloads its wheels there")
    bundle = make_tiny_bundle(tmp_path / "bundle" / "pneumonia-cxr", version="0.1.0")
    out = tmp_path / "greengrass-build"
    command = [sys.executable, "-m", "components.build", "--out", str(out), "--bundle", str(bundle)]
    result = subprocess.run(
        [*command, "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    artifact = out / "artifacts" / build.RUNTIME / build.project_metadata()[1] / build.RUNTIME_ARTIFACT
    with zipfile.ZipFile(artifact) as archive:
        wheels = archive.namelist()
    names = {canonicalize_name(w.split("-")[0]) for w in wheels}
    for dependency in build.project_metadata()[2]:
        assert canonicalize_name(Requirement(dependency).name) in names, f"{dependency} not shipped"
    # watchdog ships aarch64 wheels only as manylinux2014 (manylinux_2_17): the failure.
    assert any(w.startswith("watchdog-") and "_aarch64" in w for w in wheels), wheels
    for wheel in wheels:
        platform_tags = wheel.removesuffix(".whl").split("-")[-1]
        assert platform_tags == "any" or "aarch64" in platform_tags, f"{wheel} is not for 64-bit ARM"
        if "cp3" in wheel.split("-")[-2]:
            assert re.search(r"-(cp311|abi3)-", wheel), f"{wheel} is not for CPython 3.11"


# --------------------------------------------------------------------------------------------------
# The deploy command: one text, printed by the build and shown in docs/greengrass.md


def built_versions() -> dict[str, str]:
    """What a default build makes: the runtime at pyproject's version, the bundled model's version."""
    manifest = REPO_ROOT / "edge_runtime" / "models" / "pneumonia-cxr" / "manifest.json"
    return {
        build.RUNTIME: PYPROJECT["project"]["version"],
        build.MODEL: json.loads(manifest.read_text(encoding="utf-8"))["version"],
    }


def test_the_manual_shows_the_deploy_command_the_build_prints() -> None:
    command = build.deploy_command("greengrass-build", built_versions())
    assert command in readme_section((GREENGRASS_MANUAL, "## Build and deploy the components"))
    assert '--runWith "com.healthdiag.EdgeInference:posixUser=ggc_user:ggc_group"' in command


def test_deploy_command_without_the_runtime_has_no_run_as() -> None:
    command = build.deploy_command("out", {build.MODEL: "0.3.0"})
    assert "--runWith" not in command
    assert command.endswith('--merge "com.healthdiag.model.PneumoniaCXR=0.3.0"')


def test_a_default_build_prints_the_manuals_deploy_command(tmp_path: Path) -> None:
    """The real command line, as docs/greengrass.md runs it (default bundle and --out), in a temp folder."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "components" / "build.py"), "--no-deps-wheels", "--no-validate"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = build.deploy_command("greengrass-build", built_versions())
    assert f"\n{printed}\n" in result.stdout
    assert printed in GREENGRASS_MANUAL.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# CDK synth: no deprecated API, no byte-string banner


def test_cdk_app_synthesizes_without_deprecated_apis_or_byte_banners(tmp_path: Path) -> None:
    """``python -m cdk.app``, as cdk.json runs it, with jsii failing on any deprecated API call."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JSII_SILENCE_WARNING_")}
    env.update(JSII_DEPRECATED="fail", CDK_OUTDIR=str(tmp_path / "cdk.out"))
    result = subprocess.run(
        [sys.executable, "-m", "cdk.app"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deprecated" not in result.stderr.lower(), result.stderr
    assert "b'" not in result.stderr, f"jsii output printed as bytes:\n{result.stderr}"
    assert (tmp_path / "cdk.out" / "manifest.json").is_file()
