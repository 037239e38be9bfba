"""pytest plugin (`-p mutant_plugin`, with `FEDLR_MUTANT=<name>`): the named mutant's module is
imported from its changed source before any test imports it, so every test of the run sees the
mutant (the product file on disk is untouched)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from mutants import BY_NAME


def mutate(name: str) -> None:
    mutant = BY_NAME[name]
    spec = importlib.util.find_spec(mutant.module)
    if spec is None or spec.origin is None or spec.loader is None:
        raise RuntimeError(f"mutant {name}: module {mutant.module} not found")
    source = Path(spec.origin).read_text(encoding="utf-8")
    if source.count(mutant.old) != 1:  # the product changed: the mutant must be rewritten
        raise RuntimeError(f"mutant {name}: its text occurs {source.count(mutant.old)} times in "
                           f"{spec.origin}, not once")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mutant.module] = module
    exec(compile(source.replace(mutant.old, mutant.new), spec.origin, "exec"), module.__dict__)
    parent, _, child = mutant.module.rpartition(".")
    setattr(importlib.import_module(parent), child, module)


if os.environ.get("FEDLR_MUTANT"):
    mutate(os.environ["FEDLR_MUTANT"])
