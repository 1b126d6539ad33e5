#!/usr/bin/env python3
"""Build both Greengrass components in the layout ``greengrass-cli deployment create`` reads.

One command, so the recipes, the artifacts and their names can never drift apart::

    greengrass-build/
      recipes/com.healthdiag.EdgeInference-0.1.0.yaml
      recipes/com.healthdiag.model.PneumoniaCXR-0.1.0.yaml
      artifacts/com.healthdiag.EdgeInference/0.1.0/edge-runtime-wheels.zip
      artifacts/com.healthdiag.model.PneumoniaCXR/0.1.0/pneumonia-cxr.zip

greengrass-cli matches an artifact by the last segment of its ``s3://`` URI, so every file is named
exactly as in its recipe. The recipe templates in ``recipes/`` carry ``{COMPONENT_NAME}``,
``{COMPONENT_VERSION}`` and ``{BUCKET}`` placeholders; they are filled here as text (comments stay).

* Runtime (``com.healthdiag.EdgeInference``): a wheel of this project plus, unless
  ``--no-deps-wheels``, wheels of all its dependencies, zipped flat into ``edge-runtime-wheels.zip``.
  The device installs them offline (``pip install --no-index``), so the wheels must be built for the
  device: by default for this machine's CPU and Python; for another device use ``--platform`` (binary
  wheels only, always) and ``--python-version``, e.g.
  ``--platform manylinux_2_28_aarch64 --python-version 3.11`` for a 64-bit ARM box with Python 3.11 and
  glibc >= 2.28. A ``manylinux_2_Y`` tag reaches pip with every older manylinux tag it covers, down
  to ``manylinux2014`` (:func:`pip_platform_tags`; pip expands tags only for its own machine), so
  dependencies that ship only ``manylinux2014_aarch64`` wheels (watchdog) are found. Beware
  ``manylinux2014_aarch64`` alone: pip then silently picks *old* releases that still shipped
  manylinux2014 wheels (onnxruntime 1.16 instead of 1.32), so the build warns whenever a shipped
  wheel's version differs from the one installed here, where the tests ran.
  The wheel is built from a scratch copy of the source tree, so stale files in ``build/`` can never
  leak into it.
* Model (``com.healthdiag.model.PneumoniaCXR``): the bundle folder (default
  ``edge_runtime/models/pneumonia-cxr``, or ``--bundle``) is verified with the runtime's own loader
  (every sha256) and zipped with its files at the zip root: Greengrass unpacks ``pneumonia-cxr.zip``
  into ``{artifacts:decompressedPath}/pneumonia-cxr/``, which is the runtime's ``Model.BundlePath``.

Zips are reproducible (sorted entries, fixed timestamps), so an unchanged input gives the same digest.
The build ends by running :mod:`components.validate` on its output.

``--component NAME --gdk-layout`` is what each ``components/<Name>/gdk-config.json`` runs for
``gdk component build`` (custom build system): one component, recipe written as ``recipe.yaml``.

Why one module over 500 lines: it is the one place recipes, artifacts and their names are
made (the point of the module); the wheel, model and recipe steps are separate functions that
share the build folder's layout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if not __package__:
    # Run by path, as the GDK's custom build command does (``python3 ../build.py`` from
    # components/<Name>/): make the repository importable, as ``python -m`` from its root would.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components import validate
from components.names import MODEL_ARTIFACT, MODEL_COMPONENT, RUNTIME_ARTIFACT, RUNTIME_COMPONENT

COMPONENTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = COMPONENTS_DIR.parent
RECIPE_TEMPLATES = REPO_ROOT / "recipes"
RUNTIME = RUNTIME_COMPONENT
MODEL = MODEL_COMPONENT
DEFAULT_BUCKET = "BUCKET"
DEFAULT_BUNDLE = REPO_ROOT / "edge_runtime" / "models" / "pneumonia-cxr"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# Folders never copied into the scratch source tree when git cannot list the files.
_NOT_SOURCE = {
    ".git",
    ".venv",
    "build",
    "dist",
    "greengrass-build",
    "runs",
    "state",
    "inbox",
    "quarantine",
    "processed",
    "node_modules",
    "cdk.out",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
}

__all__ = ["BuildError", "BuiltComponent", "build", "deploy_command", "main", "pip_platform_tags"]


class BuildError(Exception):
    """A build step failed; the message says which and what to do."""


@dataclass(frozen=True)
class BuiltComponent:
    """One component in the build output."""

    name: str
    version: str
    recipe: Path
    artifacts: tuple[Path, ...]


# --------------------------------------------------------------------------------------------------
# Inputs


def project_metadata() -> tuple[str, str, list[str]]:
    """Name, version and runtime dependencies from ``pyproject.toml`` (the single source of truth)."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = data["project"]
    return project["name"], project["version"], list(project.get("dependencies", []))


def component_names() -> list[str]:
    """Components that have a ``components/<Name>/gdk-config.json``, checked against their folder name."""
    names = []
    for config in sorted(COMPONENTS_DIR.glob("*/gdk-config.json")):
        declared = list(_read_json(config).get("component", {}))
        if declared != [config.parent.name]:
            raise BuildError(
                f"{config} must declare exactly the component {config.parent.name!r}, not {declared}."
            )
        names.append(config.parent.name)
    return names


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_version(version: str, what: str) -> str:
    try:
        validate.parse_version(version)
    except ValueError as exc:
        raise BuildError(f"{what}: {exc}; Greengrass component versions are semantic versions.") from None
    return version


# --------------------------------------------------------------------------------------------------
# Helpers


def _run(command: Sequence[str], what: str, *, cwd: Path | None = None) -> None:
    """Run a tool; on failure raise with the end of its output (pip explains itself well)."""
    result = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")


def write_zip(zip_path: Path, members: Iterable[tuple[Path, str]]) -> Path:
    """Write a reproducible zip: sorted entries, fixed timestamps and modes, so digests are stable."""
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for source, arcname in sorted(members, key=lambda item: item[1]):
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(source, "rb") as src, archive.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return zip_path


def _source_files() -> list[str]:
    """Files of the source tree: tracked plus untracked-but-not-ignored (git), else a filtered walk."""
    try:
        listing = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [name for name in listing.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(REPO_ROOT):
            dirs[:] = [d for d in dirs if d not in _NOT_SOURCE and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(folder, n), REPO_ROOT) for n in names]
        return files


def _copy_source_tree(destination: Path, exclude: Path | None) -> Path:
    for rel in _source_files():
        source = REPO_ROOT / rel
        if not source.is_file() or (exclude is not None and source.resolve().is_relative_to(exclude)):
            continue
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


def _build_without_isolation() -> bool:
    """Build offline with the installed setuptools when it meets pyproject's ``setuptools>=68``."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    has_bdist_wheel = major >= 71 or importlib.util.find_spec("wheel") is not None
    return major >= 68 and has_bdist_wheel


# --------------------------------------------------------------------------------------------------
# Components


def version_skew(wheel_names: Iterable[str]) -> list[str]:
    """Shipped wheels whose version differs from the one installed here (where the tests ran).

    pip resolves a foreign ``--platform`` on its own and may settle on much older releases; a
    device must not run an inference stack nobody tested.
    """
    warnings = []
    for wheel in sorted(wheel_names):
        parts = wheel.split("-")
        if not wheel.endswith(".whl") or len(parts) < 5:
            continue
        name, version = parts[0], parts[1]
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != version:
            warnings.append(f"shipping {name} {version}, but {installed} is installed here (and tested)")
    return warnings


# PEP 600 / PEP 599: the oldest glibc each architecture's manylinux tags go down to, and the legacy
# names of three glibc versions (manylinux2014 is manylinux_2_17, and so on).
_MANYLINUX = re.compile(r"manylinux_2_(?P<minor>\d+)_(?P<arch>\w+)")
_OLDEST_GLIBC_MINOR = {"x86_64": 5, "i686": 5}
_OLDEST_GLIBC_MINOR_DEFAULT = 17  # aarch64, armv7l, ppc64le, s390x: manylinux2014 and later
_LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}


def pip_platform_tags(platforms: Iterable[str]) -> list[str]:
    """The ``--platform`` tags to hand pip: each ``manylinux_2_Y_ARCH`` with every older one it covers.

    pip expands a platform tag to the older tags it is compatible with only for the machine it runs
    on (and for the legacy ``manylinux2014``/``manylinux2010`` names); a foreign
    ``manylinux_2_28_aarch64`` matches only wheels tagged exactly so. Many projects ship aarch64
    wheels only as ``manylinux2014_aarch64`` (``manylinux_2_17``), e.g. watchdog, and pip then
    finds no distribution at all. A device with glibc 2.Y runs every ``manylinux_2_X`` wheel with
    X <= Y (PEP 600), so this lists them newest first, as pip's own expansion does, with the legacy
    aliases next to the versions they stand for. Other tags pass through; duplicates are dropped.

    >>> pip_platform_tags(["manylinux_2_19_aarch64"])
    ['manylinux_2_19_aarch64', 'manylinux_2_18_aarch64', 'manylinux_2_17_aarch64', 'manylinux2014_aarch64']
    """
    tags: list[str] = []
    for platform in platforms:
        match = _MANYLINUX.fullmatch(platform)
        if match is None:
            expanded = [platform]
        else:
            arch = match["arch"]
            oldest = _OLDEST_GLIBC_MINOR.get(arch, _OLDEST_GLIBC_MINOR_DEFAULT)
            expanded = []
            for minor in range(int(match["minor"]), oldest - 1, -1):
                expanded.append(f"manylinux_2_{minor}_{arch}")
                if minor in _LEGACY_MANYLINUX:
                    expanded.append(f"{_LEGACY_MANYLINUX[minor]}_{arch}")
        tags += [tag for tag in expanded if tag not in tags]
    return tags


def build_runtime_artifact(
    staging: Path,
    *,
    deps_wheels: bool,
    platforms: Sequence[str],
    python_version: str | None,
    build_isolation: bool | None,
    exclude: Path | None,
) -> tuple[Path, list[str]]:
    """Wheels of the project (and its dependencies) zipped flat; returns the zip and the wheel names."""
    _, _, dependencies = project_metadata()
    wheels = staging / "wheels"
    wheels.mkdir(parents=True)
    source = _copy_source_tree(staging / "src", exclude)
    isolation = not _build_without_isolation() if build_isolation is None else build_isolation
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--disable-pip-version-check",
        "--wheel-dir",
        str(wheels),
        str(source),
    ]
    if not isolation:
        command.insert(4, "--no-build-isolation")
    _run(command, "Building the project wheel")
    if deps_wheels and dependencies:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--dest",
            str(wheels),
        ]
        for platform in pip_platform_tags(platforms):
            command += ["--platform", platform]
        if python_version:
            command += ["--python-version", python_version]
        _run(command + dependencies, "Downloading the dependency wheels")
        for warning in version_skew(p.name for p in wheels.iterdir()):
            print(f"warning: {warning}", file=sys.stderr)
    names = sorted(p.name for p in wheels.iterdir())
    not_wheels = [n for n in names if not n.endswith(".whl")]
    if not_wheels:
        raise BuildError(
            f"Expected only wheels, got {not_wheels}: the device installs offline, "
            "so every dependency must come as a binary wheel."
        )
    zip_path = write_zip(staging / RUNTIME_ARTIFACT, [(wheels / n, n) for n in names])
    return zip_path, names


def build_model_artifact(bundle_dir: Path, staging: Path) -> tuple[Path, str]:
    """Verify the bundle with the runtime's loader and zip it; returns the zip and the bundle version."""
    from edge_runtime.bundle import MANIFEST_NAME, load_bundle
    from edge_runtime.errors import ModelBundleError
    from edge_runtime.signing import SIGNATURE_NAME

    if not (bundle_dir / MANIFEST_NAME).is_file():
        raise BuildError(
            f"No model bundle at {bundle_dir} (no {MANIFEST_NAME}). Train or copy one there, "
            "or pass --bundle PATH."
        )
    try:
        bundle = load_bundle(bundle_dir)
    except ModelBundleError as exc:
        raise BuildError(f"Model bundle {bundle_dir} failed verification: {exc}") from None
    names = [MANIFEST_NAME, *bundle.manifest.files]
    if (bundle.path / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)  # the manifest's signature: devices refuse a bundle without it
    if "MODEL_CARD.md" not in names:
        print(f"warning: {bundle_dir} has no MODEL_CARD.md; ship one with every model.", file=sys.stderr)
    zip_path = write_zip(staging / MODEL_ARTIFACT, [(bundle.path / n, n) for n in names])
    return zip_path, bundle.version


def render_recipe(name: str, version: str, bucket: str) -> str:
    """Fill the template's placeholders; refuse a template whose ComponentName is not ``name``."""
    template = RECIPE_TEMPLATES / f"{name}.yaml"
    if not template.is_file():
        raise BuildError(f"No recipe template {template}.")
    text = template.read_text(encoding="utf-8")
    for placeholder, value in (
        ("{COMPONENT_NAME}", name),
        ("{COMPONENT_VERSION}", version),
        ("{BUCKET}", bucket),
    ):
        text = text.replace(placeholder, value)
    data = validate.load_recipe_text(text)
    declared = validate.get_key(data, "ComponentName")
    if declared != name:
        raise BuildError(f"{template} declares ComponentName {declared!r}, expected {name!r}.")
    return text


def build(
    out: Path,
    *,
    version: str | None = None,
    model_version: str | None = None,
    bundle: Path | None = None,
    components: Sequence[str] | None = None,
    bucket: str = DEFAULT_BUCKET,
    deps_wheels: bool = True,
    platforms: Sequence[str] = (),
    python_version: str | None = None,
    build_isolation: bool | None = None,
    gdk_layout: bool = False,
) -> list[BuiltComponent]:
    """Build the components into ``out`` (its ``recipes/`` and ``artifacts/`` are replaced).

    Raises:
        BuildError: naming the step that failed.
    """
    known = component_names()
    if not known:
        raise BuildError(f"No components/<Name>/gdk-config.json found in {COMPONENTS_DIR}.")
    selected = list(components or known)
    unknown = [c for c in selected if c not in known]
    if unknown:
        raise BuildError(f"Unknown component(s) {unknown}; known: {known}.")
    if gdk_layout and len(selected) != 1:
        raise BuildError("--gdk-layout builds one component: pass exactly one --component.")
    if platforms and python_version is None:
        print(
            "note: --platform without --python-version: wheels are chosen for this machine's Python "
            f"{sys.version_info.major}.{sys.version_info.minor}; the device's python3 must match.",
            file=sys.stderr,
        )
    out = out.resolve()
    for sub in ("recipes", "artifacts"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "recipes").mkdir(parents=True)
    built = []
    with tempfile.TemporaryDirectory(prefix="gg-build-") as scratch:
        for name in selected:
            staging = Path(scratch) / name
            staging.mkdir()
            if name == RUNTIME:
                artifact, wheels = build_runtime_artifact(
                    staging,
                    deps_wheels=deps_wheels,
                    platforms=platforms,
                    python_version=python_version,
                    build_isolation=build_isolation,
                    exclude=out,
                )
                component_version = _check_version(version or project_metadata()[1], "--version")
                if not deps_wheels:
                    print(
                        f"note: {RUNTIME_ARTIFACT} holds only {', '.join(wheels)} (--no-deps-wheels): "
                        "a device cannot install it offline without the dependency wheels.",
                        file=sys.stderr,
                    )
            elif name == MODEL:
                artifact, bundle_version = build_model_artifact((bundle or DEFAULT_BUNDLE).resolve(), staging)
                component_version = _check_version(model_version or bundle_version, "--model-version")
            else:  # pragma: no cover - a new gdk-config.json without a builder here
                raise BuildError(f"No build step for component {name}; add one to components/build.py.")
            target = out / "artifacts" / name / component_version
            target.mkdir(parents=True)
            final = Path(shutil.move(str(artifact), target / artifact.name))
            recipe_name = "recipe.yaml" if gdk_layout else f"{name}-{component_version}.yaml"
            recipe_path = out / "recipes" / recipe_name
            recipe_path.write_text(render_recipe(name, component_version, bucket), encoding="utf-8")
            built.append(BuiltComponent(name, component_version, recipe_path, (final,)))
    return built


# --------------------------------------------------------------------------------------------------
# Deploying the result

#: The Greengrass CLI on a core device with the default root, ``/greengrass/v2``.
GREENGRASS_CLI = "sudo /greengrass/v2/bin/greengrass-cli"
#: The runtime's user and group on the device: only its Install step runs as root.
RUNTIME_POSIX_USER = "ggc_user:ggc_group"


def deploy_command(out: Path | str, versions: Mapping[str, str]) -> str:
    """The ``greengrass-cli deployment create`` command for a build in ``out`` (as README.md shows it).

    The model comes before the runtime that depends on it; the runtime runs as
    :data:`RUNTIME_POSIX_USER`. The build prints this, and a test keeps docs/greengrass.md's copy equal to
    it, so the two cannot drift apart.

    Args:
        out: the build folder as the user named it (``--out``).
        versions: component name -> version, for the components to deploy.
    """
    order = [MODEL, RUNTIME]
    names = sorted(versions, key=lambda name: (order.index(name) if name in order else len(order), name))
    lines = [
        f"{GREENGRASS_CLI} deployment create",
        f"--recipeDir {out}/recipes --artifactDir {out}/artifacts",
        " ".join(f'--merge "{name}={versions[name]}"' for name in names),
    ]
    if RUNTIME in versions:
        lines.append(f'--runWith "{RUNTIME}:posixUser={RUNTIME_POSIX_USER}"')
    return " \\\n  ".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.build",
        description="Build the Greengrass components com.healthdiag.EdgeInference (runtime) and "
        "com.healthdiag.model.PneumoniaCXR (model) into OUT/recipes/<Name>-<Version>.yaml and "
        "OUT/artifacts/<Name>/<Version>/<file>, the layout 'greengrass-cli deployment create "
        "--recipeDir OUT/recipes --artifactDir OUT/artifacts' reads, then validate the result.",
        epilog="""\
examples:
  python -m components.build                         # both components, wheels for this machine
  python -m components.build --no-deps-wheels        # fast: only this project's wheel (not installable
                                                     # offline on a device; for tests and layout checks)
  python -m components.build --platform manylinux_2_28_aarch64 --python-version 3.11
                                                     # wheels for a 64-bit ARM device (glibc >= 2.28)
                                                     # with Python 3.11 (manylinux_2_28 down to
                                                     # manylinux2014 wheels)
  python -m components.build --bundle /path/to/bundle --component com.healthdiag.model.PneumoniaCXR

The device installs the runtime offline from the shipped wheels, so they must match its CPU
architecture, glibc and Python minor version (binary wheels only). With only --platform
manylinux2014_aarch64, pip falls back to old releases that still had such wheels: the build warns
when a shipped version differs from the one installed here.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("greengrass-build"),
        help="output folder; its recipes/ and artifacts/ are replaced (default: %(default)s)",
    )
    parser.add_argument(
        "--version", help="runtime component version (default: the version in pyproject.toml)"
    )
    parser.add_argument(
        "--model-version", help="model component version (default: the bundle manifest's version)"
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        metavar="PATH",
        help=f"model bundle folder (default: {DEFAULT_BUNDLE.relative_to(REPO_ROOT)})",
    )
    parser.add_argument(
        "--component",
        action="append",
        dest="components",
        metavar="NAME",
        help="build only this component (repeatable; default: all)",
    )
    parser.add_argument(
        "--bucket",
        default=DEFAULT_BUCKET,
        help="S3 bucket written into artifact URIs; only the file name matters for a local "
        "deployment (default: %(default)s)",
    )
    parser.add_argument(
        "--no-deps-wheels",
        dest="deps_wheels",
        action="store_false",
        help="ship only this project's wheel, not its dependencies (fast, offline)",
    )
    parser.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        default=[],
        metavar="TAG",
        help="pip platform tag of the device, e.g. manylinux_2_28_aarch64 (repeatable; a manylinux_2_Y "
        "tag also accepts wheels for every older glibc, down to manylinux2014)",
    )
    parser.add_argument(
        "--python-version",
        metavar="X.Y",
        help="Python version of the device's python3 (default: this interpreter's)",
    )
    isolation = parser.add_mutually_exclusive_group()
    isolation.add_argument(
        "--build-isolation",
        dest="build_isolation",
        action="store_true",
        default=None,
        help="build the project wheel in an isolated environment (downloads setuptools)",
    )
    isolation.add_argument(
        "--no-build-isolation",
        dest="build_isolation",
        action="store_false",
        help="build with the installed setuptools (default when it is >= 68)",
    )
    parser.add_argument(
        "--gdk-layout",
        action="store_true",
        help="write the recipe as recipes/recipe.yaml, as 'gdk component publish' expects "
        "(used by components/<Name>/gdk-config.json; needs one --component)",
    )
    parser.add_argument(
        "--schemas",
        type=Path,
        metavar="DIR",
        help="recipe schema folder for the final validation "
        "(default: ../shared/greengrass/schemas; skipped with a note when absent)",
    )
    parser.add_argument(
        "--no-validate", dest="validate", action="store_false", help="skip the final validation"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build, validate, and print what was produced (exit 1 on any failure)."""
    args = _parser().parse_args(argv)
    try:
        built = build(
            args.out,
            version=args.version,
            model_version=args.model_version,
            bundle=args.bundle,
            components=args.components,
            bucket=args.bucket,
            deps_wheels=args.deps_wheels,
            platforms=args.platforms,
            python_version=args.python_version,
            build_isolation=args.build_isolation,
            gdk_layout=args.gdk_layout,
        )
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for component in built:
        print(f"{component.name} {component.version}")
        for path in (component.recipe, *component.artifacts):
            print(f"  {path}")
    if args.validate:
        try:
            schemas = validate.resolve_schemas(args.schemas, required=False)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        problems = validate.validate_build(args.out, schemas=schemas)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if problems:
            return 1
    print("\nDeploy locally, on the core device (see docs/greengrass.md):")
    print(deploy_command(args.out, {c.name: c.version for c in built}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
