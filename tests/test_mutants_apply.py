"""The mutation check (`make mutation`) only means something while each planted bug still applies:
every snippet of tools/mutants.py must occur exactly once in its file, and the tests it names
must exist. Checked in `make test` so a refactor that moves a snippet is noticed at once, not at
the next `make mutation`."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _mutants():
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutants", module)   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


MUTANTS = _mutants()


def test_at_least_the_issue_16_mutants_and_one_per_face():
    names = {m.name for m in MUTANTS}
    assert {"moe-gate-detached", "moe-load-without-ste"} <= names
    assert len(names) == len(MUTANTS), "mutant names must be unique"
    faces = " ".join(m.face for m in MUTANTS)
    for face in ("MoE layer", "MoE pass", "ShiftLinear layer", "ShiftLinear pass", "ShiftLinear kernel",
                 "AddLinearAttention layer", "AddLinearAttention pass", "AddLinearAttention kernel"):
        assert face in faces, face


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_once_and_names_real_tests(mutant):
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.original) == 1, f"{mutant.name}: snippet found {text.count(mutant.original)} times"
    assert mutant.original != mutant.replacement
    for arg in mutant.tests:
        if arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).is_file(), arg
