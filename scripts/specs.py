"""Model specs in the commands (`ref-lm`, a directory, `qst:DIR`, `pruned:DIR`, `lowrank:DIR`).

The method packages register their prefixes with `eval.model_specs` when imported; the commands
import them here, at run time (not when the parser is built), and load through the registry.
"""

from __future__ import annotations

SPEC_HELP = ("'ref-lm', a local model directory (plain, pruned, low-rank or a QST side network) or a hub id; "
             "or qst:DIR, pruned:DIR, lowrank:DIR")


def import_method_packages() -> None:
    import lowrank_vit  # noqa: F401 - registers lowrank:
    import pruning  # noqa: F401 - registers pruned:
    import qst  # noqa: F401 - registers qst:


def load_spec(spec, base: str | None = None, device: str = "cpu"):
    """(model, tokenizer) for a model spec (see `eval.model_specs`)."""
    from eval.model_specs import load_model_spec

    import_method_packages()
    return load_model_spec(spec, base=base, device=device)
