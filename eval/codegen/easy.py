"""The easy tier: one-line method bodies in the idioms of the corpus ref-lm read, split validation / test.

The shipped problems (`slimtune_problems.jsonl`) ask for stand-alone functions such as
`count_vowels`; the 1.8 M-parameter reference model solves none of them. Its training text (the
stdlib, Django, sympy, ...) is full of small classes whose methods are one line long: a getter
`return self.name`, a property `return self._name`, a setter `self.name = name`, an `__init__`
that stores its argument, a `__str__` that returns an attribute. Each problem here is one such
method, the last one of a small class, with the rest of the class as context:

    def get_path_of(path, mode):          # the entry point the tests call (plain values in, out)
        return Node(path, mode).get_path()


    class Node:

        def __init__(self, path, mode):
            self.path = path
            self.mode = mode

        def get_path(self):
            \"\"\"Return the path.\"\"\"
                                          <- the model writes the body from here

The entry point is a module-level function in front of the class, because the sandbox passes
only plain data between the tests and the solution (an instance cannot cross it). The class
always holds a second attribute, so a body that returns or sets the wrong one fails the tests;
so do `pass` and `return None`.

Problems are generated, not hand-picked: every family (`FAMILIES`) crossed with every
attribute name (`ATTRIBUTES`, common attribute names of the corpus), class names and the second
attribute drawn with a fixed seed. The split is stratified by family: a third of each family's
attribute names (chosen with the seed) are validation problems, on which sampler settings are
chosen; the rest are the test problems that results are reported on. No problem was kept or
dropped by how the model did on it. `python -m eval.codegen.easy` rewrites the two JSONL files
in data/ (the tests check that they are what this module generates).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Attribute names common in the corpus's classes (stdlib, Django, sympy, docutils, ...).
ATTRIBUTES = ("name", "value", "data", "path", "parent", "key", "label", "title", "size", "mode",
              "source", "text", "model", "options", "args", "root", "content", "message", "level",
              "index", "status", "version", "filename", "prefix", "encoding", "host", "user", "field",
              "config", "result")
CLASS_NAMES = ("Node", "Item", "Entry", "Field", "Record", "Option", "Token", "Element", "Message",
               "Handler", "Request", "Response", "Widget", "Column", "Document", "Section", "Target",
               "Resource", "Source", "Variable")
# family: (method line, docstring or None, entry point's name, canonical body); {a} is the
# attribute asked for.
FAMILIES = {
    "getter": ("def get_{a}(self):", "Return the {a}.", "get_{a}_of", "return self.{a}"),
    "property": ("@property\n    def {a}(self):", "Return the {a}.", "{a}_of", "return self._{a}"),
    "setter": ("def set_{a}(self, {a}):", "Set the {a}.", "set_{a}_of", "self.{a} = {a}"),
    "init": ("def __init__(self, {a}):", None, "make_with_{a}", "self.{a} = {a}"),
    "str": ("def __str__(self):", None, "str_of", "return str(self.{a})"),
}
VALIDATION_FRACTION = 1 / 3
SEED = 23
_DATA_DIR = Path(__file__).resolve().parent / "data"
SPLIT_FILES = {"validation": _DATA_DIR / "slimtune_easy_validation.jsonl",
               "test": _DATA_DIR / "slimtune_easy_test.jsonl"}


def easy_problem(family: str, a: str, b: str, cls: str) -> dict[str, str]:
    """One problem (HumanEval fields) of `family` asking for attribute `a`; `b` is the other attribute."""
    method, docstring, entry, body = FAMILIES[family]
    private = "_" if family == "property" else ""
    entry = entry.format(a=a)
    if family == "init":  # the class is built by the method being written: one argument
        init = ""
        entry_def = f"def {entry}({a}):\n    return {cls}({a}).{a}\n"
        values = [("'alpha'",), ("42",), ("[1, 2]",)]
        expected = [v[0] for v in values]
    else:
        init = (f"    def __init__(self, {a}, {b}):\n        self.{private}{a} = {a}\n"
                f"        self.{private}{b} = {b}\n\n")
        if family == "setter":
            entry_def = (f"def {entry}({a}, {b}, new):\n    obj = {cls}({a}, {b})\n    obj.set_{a}(new)\n"
                         f"    return obj.{a}\n")
            values = [("'old'", "'other'", "'new'"), ("1", "2", "3"), ("None", "0", "'x'")]
            expected = [v[2] for v in values]
        elif family == "str":
            entry_def = f"def {entry}({a}, {b}):\n    return str({cls}({a}, {b}))\n"
            # Strings only: `return self.{a}`, the corpus's usual __str__, is as right as str(...).
            values = [("'alpha'", "'beta'"), ("'x.y'", "'z'"), ("''", "'w'")]
            expected = [v[0] for v in values]
        else:
            call = f"get_{a}()" if family == "getter" else a
            entry_def = f"def {entry}({a}, {b}):\n    return {cls}({a}, {b}).{call}\n"
            values = [("'alpha'", "'beta'"), ("1", "2"), ("None", "'x'")]
            expected = [v[0] for v in values]
    doc = f'        """{docstring.format(a=a)}"""\n' if docstring else ""
    prompt = (f"{entry_def}\n\nclass {cls}:\n\n{init}    {method.format(a=a)}\n{doc}")
    asserts = "".join(f"    assert candidate({', '.join(v)}) == {e}\n" for v, e in zip(values, expected))
    return {"task_id": f"slimtune-easy/{family}/{a}", "prompt": prompt, "entry_point": entry,
            "canonical_solution": f"        {body.format(a=a)}\n", "test": f"def check(candidate):\n{asserts}",
            "family": family}


def easy_tier(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
    """Every problem of the tier, as {"validation": [...], "test": [...]} (deterministic for a seed)."""
    rng = random.Random(seed)
    split: dict[str, list[dict[str, str]]] = {"validation": [], "test": []}
    for family in FAMILIES:
        names = list(ATTRIBUTES)
        rng.shuffle(names)
        n_validation = round(len(names) * VALIDATION_FRACTION)
        for i, a in enumerate(names):
            b = rng.choice([x for x in ATTRIBUTES if x != a])
            problem = easy_problem(family, a, b, rng.choice(CLASS_NAMES))
            split["validation" if i < n_validation else "test"].append(problem)
    return split


def write_easy_tier(seed: int = SEED) -> dict[str, Path]:
    """Write the tier's two JSONL files into the package's data/ folder; returns their paths."""
    for name, problems in easy_tier(seed).items():
        SPLIT_FILES[name].write_text("".join(json.dumps(p) + "\n" for p in problems), encoding="utf-8")
    return dict(SPLIT_FILES)


if __name__ == "__main__":
    for name, path in write_easy_tier().items():
        print(f"{name}: {path}")
