"""``ModelEntry.trainer_class``: the TRAINER-* clauses hand the model to the Trainer the implementation's users train
with. A subclass that hides ``is_quantized`` around ``Trainer.__init__`` (what AdapterHub ``adapters`` 1.3.0
``AdapterTrainer`` does, findings adapters 7) lets a purely quantized model through, and the clause says so; the
reference's entry names none (``transformers.Trainer``) and passes."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

from transformers import Trainer  # noqa: E402

from conformance.clauses.clause import registry  # noqa: E402
from conformance.clauses.interface import AdapterSpec  # noqa: E402
from conformance.clauses.trainer.checks import trainer_class  # noqa: E402
from conformance.harness.execute import run_clause  # noqa: E402
from conformance.impls.reference import ReferenceImplementation  # noqa: E402
from conformance.reference.model import ReferenceModelEntry  # noqa: E402


class HidingTrainer(Trainer):
    """``AdapterTrainer``'s ``__init__``: ``model.is_quantized = False`` around ``Trainer.__init__``."""

    def __init__(self, model: Any = None, **kwargs: Any) -> None:
        was = getattr(model, "is_quantized", False)
        model.is_quantized = False
        try:
            super().__init__(model=model, **kwargs)
        finally:
            model.is_quantized = was


class HidingEntry(ReferenceModelEntry):
    def trainer_class(self) -> type:
        return HidingTrainer


class HidingImplementation(ReferenceImplementation):
    name = "hiding-trainer"

    @property
    def model(self) -> HidingEntry:
        return HidingEntry(self.create, AdapterSpec)


def test_the_entry_names_the_trainer() -> None:
    assert trainer_class(ReferenceImplementation()) is None
    assert trainer_class(HidingImplementation()) is HidingTrainer


def test_a_trainer_that_hides_is_quantized_fails_the_rule() -> None:
    clause = registry()["TRAINER-REJECT-PURELY-QUANTIZED"]
    assert run_clause(clause, ReferenceImplementation()).outcome == "passed"
    res = run_clause(clause, HidingImplementation())
    assert res.outcome == "failed" and "accepted a purely quantized model" in res.message, res.message
