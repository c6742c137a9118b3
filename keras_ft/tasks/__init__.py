"""Fine-tuning tasks on the shared recipe (the interface: `tasks.base`).

    image_classification   single-label image classification (the first task)
    text_classification    single-label text classification on a BERT-family
                           encoder (KerasHub; the `text` extra)
    semantic_segmentation  a class per pixel: a DeepLabV3+ decoder on the
                           image backbones
    object_detection       boxes and classes of objects: a RetinaNet head on
                           the image backbones
"""

from __future__ import annotations

from keras_ft.tasks.base import Task, TaskData
from keras_ft.tasks.image_classification import ImageClassification, ImageData
from keras_ft.tasks.object_detection import DetData, ObjectDetection
from keras_ft.tasks.semantic_segmentation import SegData, SemanticSegmentation
from keras_ft.tasks.text_classification import TextClassification, TextData

_TASKS = {
    ImageClassification.name: ImageClassification,
    TextClassification.name: TextClassification,
    SemanticSegmentation.name: SemanticSegmentation,
    ObjectDetection.name: ObjectDetection,
}


def names() -> tuple[str, ...]:
    """The valid values of the `task` config key."""
    return tuple(_TASKS)


def register(task: type[Task]) -> type[Task]:
    """Lists a `Task` subclass under its `name` (usable as a class decorator).

    A task of keras_ft's own is listed here in this module; a user's own task
    may be registered from their code before `trainer.train` runs.
    """
    if not (isinstance(task, type) and issubclass(task, Task)) or not task.name:
        raise ValueError(f"{task!r} is not a Task subclass with a name.")
    if task.name in _TASKS and _TASKS[task.name] is not task:
        raise ValueError(f"A task named {task.name!r} is registered already.")
    _TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    """The task called `name`."""
    if name not in _TASKS:
        raise ValueError(f"Unknown task {name!r}. Choose one of: {', '.join(_TASKS)}.")
    return _TASKS[name]()
