"""keras_ft: fine-tune pretrained Keras backbones with a sound recipe."""

from keras_ft import augment, backbones, callbacks, checkpoint, data, export, freezing
from keras_ft import lr_finder, optim, recipe, report, schedules, sources, spec, stages
from keras_ft import tasks, validate, workdir
from keras_ft.api import fine_tune
from keras_ft.model import Classifier, FineTuneModel, build_classifier
from keras_ft.text_model import TextClassifier
from keras_ft.optim import SGD, AdamW
from keras_ft.trainer import Result

__version__ = "0.1.0"
