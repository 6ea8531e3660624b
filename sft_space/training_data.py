"""The examples a run trains on: checked (invalid rows refused unless the person chose to skip them), split into
training and validation, fingerprinted, and tokenized into the Arrow columns the trainer reads.

The tokens are the renderer's, as the preview shows them (`render.Tokens`, kept by the check), with `labels` of
-100 wherever a token is not trained: the trainer computes loss on exactly the tokens the preview highlights.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from dataclasses import dataclass
from typing import Any, Callable

from . import checks, formats, render
from .errors import Message, UserError
from .hardware import TrainingPlan
from .planning import EvaluationPlan, evaluation_plan
from .render import render_example
from .settings import RunSettings


class InvalidRows(UserError):
    """Rows with errors, and no choice made to skip them: `problem` says which, `valid_rows` how many are left to
    train on; the message says what to do in the app's words (the command line names its flag instead)."""

    def __init__(self, problem: str, valid_rows: int):
        self.problem, self.valid_rows = problem, valid_rows
        super().__init__(Message(problem, " ", checks.invalid_rows_advice(valid_rows)))


def example_tokens(tokenizer: Any, example: formats.Example) -> render.Tokens:
    """The example's tokens and trained flags: those the check kept, else rendered now."""
    return example.tokens if example.tokens is not None else _tokens_of(render_example(tokenizer, example))


@dataclass
class PreparedData:
    report: checks.Report
    train: list[formats.Example]
    validation: list[formats.Example]

    @property
    def fingerprint(self) -> str:
        """Changes whenever the examples trained on change (content, order or split)."""
        digest = hashlib.sha256()
        for split, examples in (("train", self.train), ("validation", self.validation)):
            for example in examples:
                digest.update(split.encode())
                digest.update(json.dumps(example.messages if example.messages is not None else example.text,
                                         sort_keys=True, ensure_ascii=False).encode())
        return "sha256:" + digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {"source": self.report.source, "format": self.report.format, "rows": self.report.rows,
                "invalid_rows_skipped": self.report.invalid_rows, "train_examples": len(self.train),
                "validation_examples": len(self.validation), "fingerprint": self.fingerprint,
                "stats": self.report.stats()}

    def evaluation_plan(self, settings: RunSettings, plan: TrainingPlan, tokenizer: Any,
                        examples_per_step: int) -> EvaluationPlan | None:
        """`planning.evaluation_plan` for these examples; `examples_per_step` across every process."""
        def tokens(examples: list[formats.Example]) -> int:
            return sum(len(example_tokens(tokenizer, example).ids) for example in examples)

        return evaluation_plan(settings, plan, len(self.train), tokens(self.train), len(self.validation),
                               tokens(self.validation), examples_per_step)


def prepare_data(settings: RunSettings, tokenizer: Any,
                 on_progress: Callable[[int, int | None], None] | None = None) -> PreparedData:
    """Check the data and split it; invalid rows stop the run unless the user chose to skip them."""
    report = checks.check_data(settings, tokenizer, on_progress, keep_tokens=True)
    if report.errors and not settings.skip_invalid_rows:
        counts = ", ".join(f"{code} ×{n}" for code, n in sorted(report.error_counts().items()))
        first = report.errors[0].message
        raise InvalidRows(f"{report.source}: {report.invalid_rows} of {report.rows} rows have errors ({counts}); "
                          f"the first: {first}", report.valid_rows)
    if not report.valid_examples:
        raise UserError(f"{report.source}: no valid example to train on.")
    # At most max_validation_examples are held out; the rest of the share is trained on. A held-out example is
    # worth the time its evaluations take, and past a few hundred the mean loss barely moves while each
    # evaluation keeps growing (10% of 100,000 rows would be 10,000 examples each time).
    examples = report.valid_examples
    fraction = min(settings.validation_fraction, settings.max_validation_examples / len(examples))
    train, validation = split_train_validation(examples, fraction, settings.seed)
    return PreparedData(report, train, validation)


def split_train_validation(examples: list[formats.Example], validation_fraction: float,
                           seed: int) -> tuple[list[formats.Example], list[formats.Example]]:
    """A deterministic split: the same examples, fraction and seed always give the same two lists."""
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_validation = round(len(examples) * validation_fraction)
    if validation_fraction > 0 and len(examples) >= 2:
        n_validation = min(max(n_validation, 1), len(examples) - 1)
    held_out = set(order[:n_validation])
    train = [e for i, e in enumerate(examples) if i not in held_out]
    validation = [e for i, e in enumerate(examples) if i in held_out]
    return train, validation


def tokenize_examples(tokenizer: Any, examples: list[formats.Example]) -> Any:
    """A datasets.Dataset of `input_ids` and `labels` (the id where the token is trained, -100 where not), rendered
    like the preview.

    Examples the check already tokenized (`Example.tokens`) are used as they are: a large dataset is rendered and
    tokenized once, not again here. The columns are built as Arrow arrays straight from the compact tokens, and
    the labels with one vectorised select: TRL uses labels it is given as they are (building them itself takes a
    Python loop over every token, ~10 s per 100,000 rows).
    """
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    tokens = [example_tokens(tokenizer, example) for example in examples]
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(t.ids) for t in tokens], dtype=np.int64)]),
                       type=pa.int32())
    ids = np.frombuffer(b"".join(t.ids.tobytes() for t in tokens), dtype=np.int32)
    trained = np.frombuffer(b"".join(t.trained for t in tokens), dtype=np.int8).astype(bool)
    labels = np.where(trained, ids, np.int32(-100))
    return Dataset(pa.table({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                             "labels": pa.ListArray.from_arrays(offsets, labels)}))


def token_count(dataset: Any) -> int:
    """The tokens in a tokenized dataset, counted in Arrow (reading a large `input_ids` column into Python lists
    takes seconds)."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def _tokens_of(rendered: Any) -> render.Tokens:
    return render.Tokens(array("i", rendered.input_ids), bytes(bytearray(map(int, rendered.trained))))

