"""The baseline a fine-tuned text encoder must beat: TF-IDF + logistic regression.

    python -m launch.text_baseline --config=configs/text_quickstart.py
    python -m launch.text_baseline --config=configs/text_quickstart.py --workdir=/tmp/keras_ft_text

Reads the texts of a text config exactly as `launch.train` does (the same
source, checks, seeded split and `data.train_per_class`), fits word 1-2-gram
TF-IDF features (sublinear term frequency) and a logistic regression whose
regularisation is chosen by 5-fold cross-validation on the training split
only, and prints its validation accuracy. With --workdir (a finished run of
the same config), prints the run's accuracy beside it. Writes nothing.
Needs scikit-learn (`pip install scikit-learn`).

Exit codes: 0 done, 1 a bug, 2 bad input.
"""

from __future__ import annotations

import json
import os
import time
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from launch import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "A text task's config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Optional: a finished run of the config, to compare.")
flags.mark_flags_as_required(["config"])


def tfidf_accuracy(train_set, val_set, seed: int) -> float:
    """Validation accuracy of TF-IDF (word 1-2-grams) + logistic regression,
    its C chosen by 5-fold cross-validation on `train_set`."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegressionCV
    except ImportError:
        raise ValueError("The TF-IDF baseline needs scikit-learn: pip install scikit-learn.") from None
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    features = vectorizer.fit_transform(train_set.texts)
    model = LogisticRegressionCV(Cs=10, cv=5, max_iter=5000, random_state=seed)
    with warnings.catch_warnings():  # scikit-learn 1.9's notice about its own attributes
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(features, train_set.labels)
    return float(model.score(vectorizer.transform(val_set.texts), val_set.labels))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = cli.loaded_config(_CONFIG)
    if config is None:
        return cli.EXIT_BAD_INPUT
    cli.import_tensorflow()
    from keras_ft import spec as spec_lib
    from keras_ft.tasks import text_classification

    try:
        spec = spec_lib.resolve(config)
        if spec.task != text_classification.TextClassification.name:
            raise ValueError(f"--config is a {spec.task} config: the TF-IDF baseline is for "
                             "task='text_classification'.")
        _, train_set, val_set, _ = text_classification.load_splits(spec.data, spec.seed)
        start = time.perf_counter()
        accuracy = tfidf_accuracy(train_set, val_set, spec.seed)
    except cli.INPUT_ERRORS as e:
        return cli.fail(e)
    logging.info("TF-IDF + logistic regression on %s: val_accuracy %.4f (%d train / %d validation "
                 "texts, %.1f s).", spec.data.source, accuracy, len(train_set), len(val_set),
                 time.perf_counter() - start)
    if _WORKDIR.value:
        path = os.path.join(_WORKDIR.value, "metrics.json")
        try:
            with open(path) as f:
                metrics = json.load(f)
        except (OSError, ValueError) as e:
            return cli.fail(f"cannot read {path} ({e}): give a finished run's --workdir.")
        if metrics.get("val_images") != len(val_set):
            return cli.fail(f"{_WORKDIR.value} validated on {metrics.get('val_images')} texts, this "
                            f"config's split has {len(val_set)}: not a run of the same config.")
        run = metrics[metrics["main_metric"]]
        logging.info("Fine-tuned %s (%s): val_accuracy %.4f, %+.1f points over the baseline.",
                     spec.model.backbone, _WORKDIR.value, run, 100 * (run - accuracy))
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=cli.parse_flags)
