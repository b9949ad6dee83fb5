"""Every `slimtune ...` command the docs show parses against the real CLI, and no doc points
outside the repository.

The docs' commands are how a reader reproduces a result from a fresh clone; a renamed flag or a
removed subcommand must fail here, not in the reader's shell. The commands are only parsed
(subcommand, flags, literal choice values), never run.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from scripts.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "results").glob("*.md")])
RECIPES = sorted((ROOT / "docs" / "recipes").glob("*.py")) if (ROOT / "docs" / "recipes").is_dir() else []

# A path into a machine's own folders (the check the repository's before-stop hook runs). Only
# the throw-away /tmp/slimtune... and /tmp/pytest... names may appear.
OUTSIDE_PATH = re.compile(r"""(^|[ `'"(=])/(work|tmp|root|home)/[A-Za-z0-9_.-]+""")
ALLOWED_TMP = re.compile(r"/tmp/(slimtune|pytest)")
# Absolute paths a command may show: a user's own data, as the examples write it.
EXAMPLE_DATA_ROOTS = ("/data/",)
# What may stand before `slimtune` on a command line without changing what it parses.
WRAPPERS = {"nice", "nohup", "time", "/usr/bin/time", "env", "timeout", "$", "exec"}
SEPARATORS = re.compile(r"\s(?:&&|\|\||;|\|)\s|;\s*$")
FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
ASSIGNMENT = re.compile(r"""^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(?:"([^"]*)"|'([^']*)'|(\S*))\s*$""")


def _logical_lines(block: str) -> list[str]:
    """The block's lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", block).splitlines()


def _expand(line: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)


def _split(segment: str) -> list[str]:
    try:
        return shlex.split(segment, comments=True)
    except ValueError:  # an unbalanced quote in prose: whitespace is good enough
        return segment.split()


def _slimtune_argv(segment: str) -> list[str] | None:
    """The arguments after `slimtune` when `segment` runs it, else None."""
    tokens = _split(segment)
    if not tokens:
        return None
    is_slimtune = [t.rsplit("/", 1)[-1] == "slimtune" for t in tokens]
    starts_a_command = (is_slimtune[0] or tokens[0] in WRAPPERS
                        or bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0])))
    if not starts_a_command or not any(is_slimtune):
        return None  # prose or program output that mentions slimtune
    i = is_slimtune.index(True)  # after wrappers and their options (`nice -n 10`, `time -f FMT`)
    argv = []
    for token in tokens[i + 1:]:
        if token.startswith((">", "2>", "&", "<")) or token in {"|", "&&", ";"}:
            break  # a redirection ends the command's own arguments
        argv.append(token)
    return argv


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """(the line as written, its argv after `slimtune`) for every command in code blocks and spans."""
    found = []
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    for block in blocks:
        variables: dict[str, str] = {}
        for line in _logical_lines(block):
            assigned = ASSIGNMENT.match(line.strip())
            if assigned:
                variables[assigned.group(1)] = next(g for g in assigned.groups()[1:] if g is not None)
                continue
            for segment in SEPARATORS.split(_expand(line.strip().removeprefix("$ "), variables)):
                argv = _slimtune_argv(segment)
                if argv is not None:
                    found.append((line.strip(), argv))
    for span in INLINE.findall(prose):
        argv = _slimtune_argv(span.removeprefix("$ "))
        if argv is not None:
            found.append((span, argv))
    return found


def _alternatives(argv: list[str]) -> list[list[str]]:
    """`reference {lm,vit}` written as one command stands for both."""
    for i, token in enumerate(argv):
        braces = re.fullmatch(r"\{([^{}]+)\}", token)
        if braces:
            return [alt for choice in braces.group(1).split(",") for alt in _alternatives([*argv[:i], choice, *argv[i + 1:]])]
    return [argv]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _is_placeholder(token: str) -> bool:
    # `...`, KIND, DIR, <model>, $OUT/x: written for the reader to fill in
    return "..." in token or "$" in token or token.startswith("<") or bool(re.fullmatch(r"[A-Z][A-Z0-9_]*:?", token))


def _problems(argv: list[str], subparsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    """What does not parse: an unknown subcommand or flag, a literal value outside a flag's choices,
    an absolute path outside the repository."""
    argv = [t for t in argv if t not in {"-v", "--verbose"}]
    if not argv or argv[0] in {"-h", "--help"}:
        return []
    problems = [f"{token!r} is an absolute path outside the repository (use a relative path like runs/...)"
                for token in argv if _absolute_outside(token)]
    if _is_placeholder(argv[0]):
        return problems
    if argv[0] not in subparsers:
        return [*problems, f"no subcommand {argv[0]!r}"]
    sub = subparsers[argv[0]]
    options = sub._option_string_actions
    positionals = [a for a in sub._actions if not a.option_strings]
    position, i = 0, 1
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and not re.fullmatch(r"-\d.*", token):
            flag, _, inline = token.partition("=")
            action = options.get(flag)
            if action is None:
                problems.append(f"no flag {flag} in `slimtune {argv[0]}`")
                i += 1
                continue
            value = inline or (argv[i + 1] if action.nargs != 0 and i + 1 < len(argv) else None)
            if action.choices and value is not None and not _is_placeholder(value) and "," not in value:
                if _converted(action, value) not in action.choices:
                    problems.append(f"{flag} {value!r} is not one of {sorted(map(str, action.choices))}")
            i += 1 if inline or action.nargs == 0 else 2
            continue
        if position < len(positionals) and positionals[position].choices and not _is_placeholder(token):
            if token not in positionals[position].choices:
                problems.append(f"{token!r} is not one of {sorted(positionals[position].choices)}")
        position += 1
        i += 1
    return problems


def _absolute_outside(token: str) -> bool:
    """`/x/y`, `--out=/x/y` or `pruned:/x/y`, unless it is example user data."""
    paths = [token, *re.findall(r"[=:](/[^,\s]*)", token)]
    return any(p.startswith("/") and not p.startswith("//") and not p.startswith(EXAMPLE_DATA_ROOTS) for p in paths)


def _converted(action: argparse.Action, value: str):
    try:
        return action.type(value) if callable(action.type) else value
    except (TypeError, ValueError):
        return value


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_slimtune_command_in_the_docs_parses(doc):
    subparsers = _subparsers()
    bad = [f"{_doc_id(doc)}: `{line}`: {problem}"
           for line, argv in _commands(doc.read_text(encoding="utf-8"))
           for alternative in _alternatives(argv)
           for problem in _problems(alternative, subparsers)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", DOCS + RECIPES, ids=_doc_id)
def test_no_doc_or_recipe_points_outside_the_repository(path):
    bad = [f"{_doc_id(path)}:{n}: {line.strip()}" for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
           if OUTSIDE_PATH.search(line) and not ALLOWED_TMP.search(line)]
    assert not bad, "\n".join(bad)


def test_the_command_finder_sees_what_the_docs_write():
    text = """
Run `slimtune reference {lm,vit}` or `SLIMTUNE_THREADS=1 slimtune bench --quick`.

```bash
OUT=runs/x
C="--calib runs/calib --eval runs/heldout"
nice -n 10 slimtune compress-lm --model ref-lm $C \\
    --keep 0.5 --out $OUT/lm50 > log.txt 2>&1 && slimtune zero-shot --model ref-lm
$ .venv/bin/slimtune prune --method nosuch --out /work/elsewhere
/usr/bin/time -f "%e s wall" slimtune estimate-memory --arch llama-2-7b
ref-lm: output that mentions slimtune bench --nope is not a command
```
"""
    commands = _commands(text)
    assert [argv[0] for _, argv in commands] == ["compress-lm", "zero-shot", "prune", "estimate-memory", "reference",
                                                 "bench"]
    compress = commands[0][1]
    assert compress == ["compress-lm", "--model", "ref-lm", "--calib", "runs/calib", "--eval", "runs/heldout",
                        "--keep", "0.5", "--out", "runs/x/lm50"]
    subparsers = _subparsers()
    assert _problems(compress, subparsers) == []
    assert [_problems(a, subparsers) for a in _alternatives(commands[4][1])] == [[], []]
    prune = _problems(commands[2][1], subparsers)
    assert any("'nosuch' is not one of" in p for p in prune) and any("absolute path" in p for p in prune)
    assert _problems(["bench", "--no-such-flag"], subparsers) == ["no flag --no-such-flag in `slimtune bench`"]
    assert _problems(["no-such-command"], subparsers) == ["no subcommand 'no-such-command'"]
    assert OUTSIDE_PATH.search("see /work/notes/x.py") and not ALLOWED_TMP.search("see /work/notes/x.py")


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_recipe_a_doc_names_is_in_the_repository(doc):
    named = set(re.findall(r"docs/recipes/[A-Za-z0-9_.-]+\.(?:py|sh)", doc.read_text(encoding="utf-8")))
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"{_doc_id(doc)} names recipes that are not in the repository: {missing}"
