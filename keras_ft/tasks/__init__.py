"""Fine-tuning tasks on the shared recipe (the interface: `tasks.base`).

    image_classification   single-label image classification (the first task)
"""

from __future__ import annotations

from keras_ft.tasks.base import Task, TaskData
from keras_ft.tasks.image_classification import ImageClassification, ImageData

_TASKS = {ImageClassification.name: ImageClassification}


def names() -> tuple[str, ...]:
    """The valid values of the `task` config key."""
    return tuple(_TASKS)


def get(name: str) -> Task:
    """The task called `name`."""
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}. Choose one of: {', '.join(_TASKS)}.")
    return _TASKS[name]()
