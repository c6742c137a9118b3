"""The range test for every freezing stage that trains a new set of variables.

The stages of a schedule differ in what trains: the head alone, then the top
blocks, then all of them. A rate found on the head-only stage says nothing
about where training the blocks diverges: on Fashion-MNIST, the quickstart
recipe at 0.03 trains its head well and collapses the moment its top
blocks unfreeze (docs/stability.md). `find` runs
`keras_ft.lr_finder.find_learning_rate` once for each stage that trains a
set of blocks no earlier stage trained (`tested`), all from the same
starting weights (each test puts every variable back, bit for bit), and
turns the suggestions into rates:

- the first stage's suggestion is `optimizer.learning_rate`;
- each later tested stage trains at its own suggestion: its `lr_scale` is
  multiplied by `StageRates.factors[stage]` = its suggestion / the first's
  (its test already ran at its configured `lr_scale`);
- a stage that trains the same blocks as an earlier tested one shares that
  one's factor.

A stage's test starts from the starting weights with the head not yet
trained, not from where the earlier stages will have left the model: it
finds where that set of variables diverges, which is what keeps a run from
collapsing at the switch.

    WORKDIR/lr_find/lr_find.json         suggestions; "stages": one entry per tested stage
    WORKDIR/lr_find/lr_find.csv          stage 1's curve; lr_find_stageK.csv the others'
    WORKDIR/lr_find/lr_find.png          every tested stage's curve
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import logging

from keras_ft import lr_finder


@dataclasses.dataclass
class StageRates:
    """What the range tests decided.

    Attributes:
        base: the value for `optimizer.learning_rate` (stage 1's suggestion).
        factors: stage index (0-based) -> factor on that stage's `lr_scale`.
        tests: tested stage index -> its `lr_finder.RangeTest` (empty when
            loaded from a workdir).
    """

    base: float
    factors: dict[int, float]
    tests: dict = dataclasses.field(default_factory=dict)


def tested(stages) -> list[int]:
    """Indices of the stages to test: the first, and each that trains a set
    of blocks (`Stage.blocks`) no earlier stage trained."""
    seen, out = set(), []
    for i, stage in enumerate(stages):
        if stage.blocks not in seen:
            seen.add(stage.blocks)
            out.append(i)
    return out


def factors_from(stages, suggestions: dict[int, float]) -> dict[int, float]:
    """Each stage's factor from the tested stages' suggestions (see the
    module docstring)."""
    first = suggestions[0]
    by_blocks = {stages[i].blocks: value / first for i, value in suggestions.items()}
    return {i: by_blocks[stage.blocks] for i, stage in enumerate(stages)}


def find(job, directory: str, title: str) -> StageRates:
    """Runs the range test of each `tested` stage of `job`'s schedule,
    saves them in `directory` and leaves the model in its first stage, every
    variable as it was."""
    f, finder = job.spec.freeze, job.spec.optimizer.lr_find
    tests = {}
    for i in tested(f.stages):
        job.apply_stage(i)
        logging.info("LR range test, stage %d: %s.", i + 1, f.stages[i].describe())
        tests[i] = lr_finder.find_learning_rate(
            job.model, job.data.train_stream(), finder.start_lr, finder.end_lr, finder.steps
        )
    job.apply_stage(0)
    rates = StageRates(
        tests[0].suggestion, factors_from(f.stages, {i: t.suggestion for i, t in tests.items()}),
        tests,
    )
    save(rates, f.stages, directory, title)
    return rates


def save(rates: StageRates, stages, directory: str, title: str) -> None:
    """Writes the tests of `rates` (see the module docstring)."""
    labels = {i: f"stage {i + 1}: {stages[i].describe()}" for i in rates.tests}
    entries = [
        dict(test.summary(), stage=i + 1, stage_name=stages[i].describe(),
             lr_factor=rates.factors[i])
        for i, test in rates.tests.items()
    ]
    first = rates.tests[0]
    lr_finder.save(
        first, directory, f"{title}, {labels[0]}",
        extra={"stages": entries, "stage_factors": {str(i): v for i, v in rates.factors.items()}},
        curves=[(labels[i], t) for i, t in rates.tests.items()] if len(rates.tests) > 1 else None,
    )
    for i, test in rates.tests.items():
        if i:
            lr_finder.write_curve(test, os.path.join(directory, f"lr_find_stage{i + 1}.csv"))


def load(directory: str) -> StageRates:
    """The rates a run found (for resuming it)."""
    base = lr_finder.load_suggestion(directory)
    with open(os.path.join(directory, lr_finder.JSON_FILE)) as f:
        saved = json.load(f).get("stage_factors", {})
    return StageRates(base, {int(i): float(v) for i, v in saved.items()})
