"""The commands a newcomer types from the README, found and parsed by the program they name.

``commands(text)`` finds every command line of the project's own programs in
the README's ``bash`` blocks (``edge-runtime ...``, ``python -m MODULE ...``),
and ``mentions(text)`` every inline reference such as `` `edge-runtime health` ``.
``parse_in_child`` then hands each one's arguments to that program's real
argument parser, in one child process, and stops right after parsing: nothing
runs, so a command that needs a device, AWS or hours of training is still
checked for a renamed subcommand, a dropped flag or a wrong value.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

#: Console scripts of this project and the module each runs.
SCRIPTS = {"edge-runtime": "edge_runtime.cli"}
#: Modules of this checkout whose command lines are checked (third-party ones, pip or pytest, are not).
OWN_MODULES = ("edge_runtime", "training", "components", "cdk", "benchmarks")


@dataclass(frozen=True)
class Command:
    """One command line: the module that runs it and its arguments."""

    line: str
    module: str
    argv: list[str]


def _logical_lines(block: str) -> list[str]:
    return block.replace("\\\n", " ").splitlines()


def _split_commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line (split at ``&&``, ``||``, ``;``, ``|``, ``&``)."""
    # A placeholder such as <canary or fleet group> is one argument.
    line = re.sub(r"<([^<>]*)>", lambda m: "<" + m[1].replace(" ", "_") + ">", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def _own_command(words: list[str], line: str) -> Command | None:
    while words and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] in ("sudo",)):
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]
    if program in SCRIPTS:
        return Command(line, SCRIPTS[program], words[1:])
    if re.fullmatch(r"python3?(\.\d+)?", program) and len(words) >= 3 and words[1] == "-m":
        module = words[2]
        if module.split(".")[0] in OWN_MODULES:
            return Command(line, module, words[3:])
    return None


def commands(markdown: str) -> list[Command]:
    """Every command line of this project's programs in the ``bash`` blocks of ``markdown``."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for line in _logical_lines(block):
            for words in _split_commands(line):
                command = _own_command(words, line.strip())
                if command is not None:
                    found.append(command)
    return found


def mentions(markdown: str) -> list[Command]:
    """Every inline `` `edge-runtime ...` `` / `` `python -m ...` `` reference: a command, maybe partial.

    A mention may leave out required arguments (`` `edge-runtime process` ``), so these are
    checked with ``--help`` added: the subcommand and each option named must exist.
    """
    found = []
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if "..." in span:
            continue
        span = re.sub(r"\[[^\]]*\]", "", span)  # optional parts: [--quick]
        for words in _split_commands(span):
            command = _own_command(words, span)
            if command is not None:
                found.append(Command(span, command.module, _fill_placeholders(command.argv)))
    return found


def _fill_placeholders(argv: list[str]) -> list[str]:
    """Usage placeholders (``COMMAND``, ``--config FILE``): a value after an option, dropped elsewhere.

    ``python -m training COMMAND`` names the program, not a subcommand called COMMAND.
    """
    filled: list[str] = []
    for word in argv:
        if re.fullmatch(r"[A-Z][A-Z_]*", word):
            if filled and filled[-1].startswith("-"):
                filled.append("x")
            continue
        filled.append(word)
    return filled


_CHILD = r"""
import argparse, contextlib, io, json, runpy, sys

class Parsed(Exception):
    pass

real_parse_args = argparse.ArgumentParser.parse_args

def parse_only(self, args=None, namespace=None):
    real_parse_args(self, args, namespace)
    raise Parsed

argparse.ArgumentParser.parse_args = parse_only
report = []
for module, argv in json.loads(sys.stdin.read()):
    sys.argv = [module, *argv]
    err = io.StringIO()
    outcome = "parsed"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
            outcome = "did not parse its arguments with argparse"
        except Parsed:
            pass
        except SystemExit as stop:
            outcome = "parsed" if stop.code in (0, None) else f"exit {stop.code}"
        except BaseException as exc:  # an import that fails, a module that is gone
            outcome = f"{type(exc).__name__}: {exc}"
    report.append([outcome, err.getvalue()[-600:]])
print(json.dumps(report))
"""


def parse_in_child(items: list[Command], help_only: bool = False) -> list[tuple[Command, str, str]]:
    """Hand each command's argv (plus ``--help`` when ``help_only``) to its module's parser.

    Returns (command, outcome, stderr) where outcome is ``"parsed"`` or what went wrong.
    """
    repo = Path(__file__).resolve().parents[1]
    payload = [[c.module, [*c.argv, "--help"] if help_only else c.argv] for c in items]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=repo,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the parsing child failed (exit {done.returncode}): {done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return [(c, outcome, err) for c, (outcome, err) in zip(items, report, strict=True)]
