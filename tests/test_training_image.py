"""The release pipeline's training image (cdk/training_image/Dockerfile), read as Docker would.

Docker cannot run here, so the Dockerfile is parsed: the base image is pinned to linux/amd64
(SageMaker's ml.m5; an image built on an arm64 laptop would not start there), torch comes alone
from PyTorch's CPU-only index at pyproject's pin (not gigabytes of CUDA from PyPI), the project is
installed with the ``training`` extra and without ``dev``, and what the image installs covers every
import of the entry point and of ``python -m training``.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from collections.abc import Iterable
from pathlib import Path

import pytest
from helpers import LOCAL_PACKAGES, PYPROJECT, installable, third_party_imports
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "cdk/training_image/Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        out.append((keyword.upper(), arguments.strip()))
    return out


def pip_installs(steps: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every ``pip install`` in the RUN steps (``&&``-chained commands split)."""
    found = []
    for keyword, arguments in steps:
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(arguments, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, "&&"]:
            if token not in ("&&", ";", "||"):
                command.append(token)
                continue
            if command[:2] in (["pip", "install"], ["pip3", "install"]) or command[1:4] == [
                "-m",
                "pip",
                "install",
            ]:
                found.append(command[command.index("install") + 1 :])
            command = []
    return found


def requirements(arguments: list[str]) -> list[str]:
    """The requirement arguments of a pip install (options and their values left out)."""
    with_value = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r", "--requirement"}
    out, skip = [], False
    for word in arguments:
        if skip:
            skip = False
        elif word in with_value:
            skip = True
        elif word == "-e" or word.startswith("-"):
            continue
        else:
            out.append(word)
    return out


def named(requirement: str) -> str | None:
    """The canonical distribution name of a requirement (None: a path such as ``.[extras]``)."""
    if requirement.startswith((".", "/")):
        return None
    return canonicalize_name(Requirement(requirement).name)


def option(arguments: list[str], *names: str) -> list[str]:
    return [arguments[i + 1] for i, word in enumerate(arguments[:-1]) if word in names]


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def project_install(installs: list[list[str]]) -> tuple[int, set[str], list[str]]:
    """(position, extras, other requirements) of the install of the project itself (``.[extras]``)."""
    for position, arguments in enumerate(installs):
        for requirement in requirements(arguments):
            match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", requirement)
            if match:
                others = [r for r in requirements(arguments) if r != requirement]
                return position, set(filter(None, (match.group(1) or "").split(","))), others
    raise AssertionError(f"{DOCKERFILE} does not install the project ('.[...]')")


def test_the_base_image_is_pinned_to_linux_amd64(steps: list[tuple[str, str]]) -> None:
    froms = [arguments for keyword, arguments in steps if keyword == "FROM"]
    assert froms, "no FROM"
    for arguments in froms:
        assert "--platform=linux/amd64" in arguments.split(), f"FROM {arguments}: SageMaker ml.m5 is x86-64"


def test_torch_comes_alone_from_the_cpu_index_at_the_training_extra_pin(steps: list[tuple[str, str]]) -> None:
    pinned = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["training"]]
    (torch,) = [r for r in pinned if r.name == "torch"]
    assert str(torch.specifier).startswith("=="), "pyproject's training extra must pin torch"
    installs = pip_installs(steps)
    with_torch = [(i, a) for i, a in enumerate(installs) if any(named(r) == "torch" for r in requirements(a))]
    assert len(with_torch) == 1, f"torch should be installed once, by itself: {installs}"
    position, arguments = with_torch[0]
    (requirement,) = requirements(arguments)  # alone: nothing else comes from PyTorch's index
    assert Requirement(requirement).specifier == torch.specifier, f"{requirement} is not pyproject's {torch}"
    assert option(arguments, "--index-url", "-i", "--extra-index-url") == [CPU_INDEX]
    # Before the project's install: otherwise that install would take torch (with CUDA) from PyPI.
    assert position < project_install(installs)[0]
    for other in installs:  # nothing else mixes PyTorch's index into PyPI's
        if other is not arguments:
            assert not option(other, "--index-url", "-i", "--extra-index-url"), other


def test_the_project_is_installed_with_the_training_extra_and_not_dev(steps: list[tuple[str, str]]) -> None:
    _, extras, _ = project_install(pip_installs(steps))
    assert "training" in extras and "dev" not in extras, extras
    assert "cdk" not in extras, "the cdk extra brings aws-cdk-lib, which the job does not run"


def _closure(roots: Iterable[str]) -> set[str]:
    """Canonical names of the distributions ``roots`` bring in (their installed metadata)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [Requirement(t) for t in requires if Requirement(t).marker is None]
    return seen


def test_the_image_installs_what_the_job_imports(steps: list[tuple[str, str]]) -> None:
    installs = pip_installs(steps)
    _, extras, others = project_install(installs)
    available = installable(extras) | _closure(others)
    available |= {n for a in installs for r in requirements(a) if (n := named(r))}
    # The training package is run from the checkout too (python -m training pipeline): follow it.
    imports = third_party_imports(
        ["cdk/training_image/entry.py", "training/__main__.py"], local_packages={*LOCAL_PACKAGES, "training"}
    )
    assert {"boto3", "torch", "semantic_version", "jsonschema"} <= set(imports)  # the walk works
    distributions = importlib.metadata.packages_distributions()
    missing = [
        f"{module} (imported by {where})"
        for module, where in sorted(imports.items())
        if not {canonicalize_name(d) for d in distributions.get(module, [])} & available
    ]
    assert not missing, f"the training image lacks: {missing}"
    copied = {a.split()[-1].removeprefix("./") for k, a in steps if k == "COPY"}
    for package in ("edge_runtime", "training", "components", "recipes", "cdk"):
        assert package in copied, f"the image does not copy {package}/"


def test_sagemaker_s_train_command_runs_the_entry_point(steps: list[tuple[str, str]]) -> None:
    runs = " ".join(arguments for keyword, arguments in steps if keyword == "RUN")
    assert "/usr/local/bin/train" in runs and "python -m cdk.training_image.entry" in runs
