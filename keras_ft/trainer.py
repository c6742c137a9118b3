"""The training recipe, top to bottom: strategy -> data -> model -> fit -> export.

This is the only module that reads the whole config; everything it calls
takes explicit arguments. Workdir layout (the contract scripts rely on):

    config.json    the resolved config of the run
    data_scan.json the check of every image file before training
    checkpoints/   atomic checkpoints (every epoch end, every
                   checkpoint.every_steps / every_seconds, and on SIGTERM);
                   a rerun resumes from the newest at the exact step
    history.csv    one row per finished epoch
    tensorboard/   TensorBoard logs
    metrics.json   final metrics (val_accuracy, val_loss, train_images_per_sec,
                   epochs, steps, ...)
    export/        SavedModel serving raw images
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import keras
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from keras_ft import augment as augment_lib
from keras_ft import backbones, callbacks, checkpoint, data, distribute, export, features
from keras_ft import freezing, lr_finder, model as model_lib, optim, preemption, schedules
from keras_ft import sources, stages as stages_lib, validate

# Keys that may differ between a run and its resumption: the learning rate,
# so that a run stopped by a NaN loss can resume from its last good
# checkpoint at a lower rate, and what changes speed, not results: the
# strategy among them, since the global batch (and so every step) stays the
# same on any number of replicas; a run preempted on 8 GPUs may go on on 4.
RESUMABLE_CHANGES = frozenset({
    "resume", "optimizer.learning_rate", "data.cache_images_mb", "train.jit_compile",
    "distribute.strategy", "distribute.cpu_devices",
})
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_history(path: str, history: list[dict]) -> None:
    keys = sorted({k for row in history for k in row})
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch"] + keys)
        writer.writeheader()
        for epoch, row in enumerate(history, 1):
            writer.writerow(dict(row, epoch=epoch))
    os.replace(tmp, path)


def _check_resumable(workdir: str, resolved: dict) -> None:
    """A rerun must match the config the workdir was started with.

    Keys added to keras_ft since the run started count as their defaults, so
    a new key does not stop old runs from resuming; setting one does.
    """
    with open(os.path.join(workdir, "config.json")) as f:
        before = _flatten(json.loads(json.dumps(_with_defaults(json.load(f)).to_dict())))
    now = _flatten(json.loads(json.dumps(resolved)))
    differing = sorted(
        k for k in before.keys() | now.keys()
        if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k)
    )
    if differing:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differing)
        raise ValueError(
            f"Cannot resume {workdir}: config differs ({details}). Use the same "
            "config, another --workdir, or --config.resume=False to start over."
        )
    for k in sorted(RESUMABLE_CHANGES - {"resume"}):
        if before.get(k) != now.get(k):
            logging.warning("Resuming with %s changed: %r -> %r.", k, before.get(k), now.get(k))


def _set_aside_old_run(workdir: str) -> None:
    """With resume=False, the old checkpoints are moved aside, not deleted."""
    old = os.path.join(workdir, "checkpoints")
    if os.path.isdir(old) and os.listdir(old):
        aside = f"{old}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(old, aside)
        logging.warning("resume=False: previous checkpoints moved to %s.", aside)


def load_splits(data_config, seed: int):
    """The data of a run, split as every entry point must split it.

    Every image is checked first (`keras_ft.validate`): bad ones are skipped
    and listed, or stop the run (`bad_files`), never dropped silently or met
    halfway through an epoch. Then the source's own train/validation split
    (train/ and val/ folders, `data.tfds_val_split`) if it has one, else the
    seeded, stratified split.

    Args:
        data_config: the `data` sub-config (a ConfigDict, or a saved dict:
            keys added since it was saved take their defaults).
        seed: the run's seed.

    Returns:
        `(dataset, train_set, val_set, scan_report)`.
    """
    if isinstance(data_config, ml_collections.ConfigDict):
        data_config = data_config.to_dict()
    config = _with_defaults({"data": dict(data_config)}).data
    dataset = sources.load_source(
        config.source,
        num_classes=config.num_classes,
        tfds_split=config.tfds_split,
        tfds_val_split=config.tfds_val_split,
        tfds_data_dir=config.tfds_data_dir,
        tfds_download=config.tfds_download,
        tfds_image_key=config.tfds_image_key,
        tfds_label_key=config.tfds_label_key,
    )
    dataset, scan_report = validate.scan(
        dataset, policy=config.bad_files, num_classes=config.num_classes or None
    )
    if dataset.val_mask is None:
        train_set, val_set = data.split(dataset, config.val_fraction, seed)
    else:
        train_set, val_set = data.split_as_given(dataset)
    return dataset, train_set, val_set, scan_report


def configured_rate(config: ml_collections.ConfigDict):
    """`optimizer.learning_rate`, scaled by the linear rule when
    `optimizer.lr_scaling="linear"`: times (global batch x accumulation
    steps) / `optimizer.lr_base_batch_size`. "auto" is returned as it is."""
    opt = config.optimizer
    rate, rule = opt.learning_rate, opt.lr_scaling
    if rule not in ("none", "linear"):
        raise ValueError(f"optimizer.lr_scaling must be 'none' or 'linear', got {rule!r}.")
    if rule == "none" or rate == "auto":
        return rate
    base = opt.lr_base_batch_size
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise ValueError(f"optimizer.lr_base_batch_size must be a positive integer, got {base!r}.")
    learning_rate_schedule(opt, 1)  # a bad rate fails with its own message
    return rate * config.train.global_batch_size * opt.accumulation_steps / base


def learning_rate_schedule(
    optimizer: ml_collections.ConfigDict, total_steps: int, learning_rate=None
):
    """The learning rate (schedule) of the `optimizer` sub-config.

    Args:
        optimizer: the `optimizer` sub-config (`schedule`, `warmup_steps`, ...).
        total_steps: the run's optimizer steps.
        learning_rate: the peak rate, in place of `optimizer.learning_rate`:
            the range test's suggestion when that is "auto".

    A constant rate without warmup stays a float (Keras keeps it as an
    optimizer variable); everything else is a `keras_ft.schedules` object. An
    "auto" rate always gives a schedule object, so the optimizer's variables
    (and checkpoints) are the same before and after the suggestion is set;
    until then its peak is a placeholder 1.0, as in `load_trained`, where the
    learning rate plays no part.
    """
    auto = optimizer.learning_rate == "auto"
    peak = optimizer.learning_rate if learning_rate is None else learning_rate
    if peak == "auto":
        peak = 1.0  # a placeholder until the range test's suggestion is set
    if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not 0 < peak < float("inf"):
        raise ValueError(
            f"optimizer.learning_rate must be a positive number or 'auto', got {peak!r}."
        )
    peak, name, warmup = float(peak), optimizer.schedule, optimizer.warmup_steps
    if name not in schedules.NAMES:
        raise ValueError(
            f"Unknown optimizer.schedule {name!r}. Choose one of: {', '.join(schedules.NAMES)}."
        )
    if warmup and name in ("cosine", "stlr"):
        raise ValueError(
            f"optimizer.warmup_steps={warmup} does not apply to schedule {name!r}: "
            "use 'warmup_cosine', 'constant' or 'step', or warmup_steps=0."
        )
    if name == "warmup_cosine" and not warmup:
        raise ValueError("optimizer.schedule='warmup_cosine' needs optimizer.warmup_steps > 0.")
    if name == "constant":
        return schedules.Constant(peak, warmup) if warmup or auto else peak
    if name in ("cosine", "warmup_cosine"):
        return schedules.WarmupCosine(peak, total_steps, warmup)
    if name == "step":
        return schedules.StepDecay(
            peak, total_steps, warmup, optimizer.decay_boundaries, optimizer.decay_factor
        )
    return schedules.SlantedTriangular(
        peak, total_steps, optimizer.stlr_cut_frac, optimizer.stlr_ratio
    )


def augmentation(config: ml_collections.ConfigDict) -> augment_lib.Augment:
    """The checked `data.augment` of `config` (a ValueError names a bad key)."""
    return augment_lib.Augment.from_config(config.data.augment)


def loss_and_metrics(one_hot: bool) -> tuple:
    """`(loss, metrics)` for int labels, or one-hot (soft) labels from MixUp/CutMix.

    Either way the metric is named "accuracy" (history.csv, metrics.json);
    with mixed labels it is agreement with the dominant label.
    """
    if one_hot:
        return (
            keras.losses.CategoricalCrossentropy(from_logits=True),
            [keras.metrics.CategoricalAccuracy(name="accuracy")],
        )
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]


def build_model(
    config: ml_collections.ConfigDict,
    class_names: list[str],
    image_size: int,
    stages: list,
    total_steps: int,
) -> model_lib.Classifier:
    """The compiled classifier of `config` (call under the strategy's scope).

    `total_steps` counts batches; with `optimizer.accumulation_steps` N, the
    learning-rate schedule runs over the N times fewer updates.

    The configured weights are loaded even when a checkpoint will replace
    them: they also decide the preprocessing and BatchNorm epsilon, which a
    checkpoint does not hold. The loss takes one-hot labels when
    `data.augment` mixes batches (MixUp/CutMix), integer labels otherwise.
    """
    weights = config.model.weights
    precision, jit_compile = _precision(config)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)  # for the layers built here
    try:
        model = model_lib.build_classifier(
            config.model.backbone,
            num_classes=len(class_names),
            image_size=image_size,
            weights=None if str(weights).lower() == "none" else weights,
            weights_sha256=config.model.weights_sha256 or None,
            dropout=config.model.dropout,
            class_names=class_names,
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if config.distribute.sync_batchnorm:
        synced = freezing.synchronize_batchnorm(model)
        logging.info("Synchronized BatchNorm: %d layers use global-batch statistics.", synced)
    if config.freeze.method == "lora":
        deepest = -1 if any(s.blocks == -1 for s in stages) else max(s.blocks for s in stages)
        adapted = freezing.enable_lora(model, config.freeze.lora_rank, deepest)
        logging.info("LoRA rank %d on %d layers.", config.freeze.lora_rank, adapted)
    model.l2sp_alpha = config.optimizer.l2sp
    loss, metrics = loss_and_metrics(augmentation(config).mixes)
    model.compile(
        optimizer=optim.SGD(
            learning_rate_schedule(
                config.optimizer,
                max(1, total_steps // config.optimizer.accumulation_steps),
                configured_rate(config),
            ),
            momentum=config.optimizer.momentum,
            nesterov=config.optimizer.nesterov,
            weight_decay=config.optimizer.weight_decay,
            global_clipnorm=config.optimizer.clip_norm or None,
            gradient_accumulation_steps=(
                config.optimizer.accumulation_steps
                if config.optimizer.accumulation_steps > 1 else None
            ),
        ),
        loss=loss,
        metrics=metrics,
        jit_compile=jit_compile,
    )  # under mixed_float16, Keras wraps the SGD in a LossScaleOptimizer
    return model


def _precision(config) -> tuple[str, bool | str]:
    """`train.precision` and `train.jit_compile`, checked."""
    precision, jit = config.train.precision, config.train.jit_compile
    if precision not in PRECISIONS:
        raise ValueError(
            f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}."
        )
    if not (isinstance(jit, bool) or jit == "auto"):
        raise ValueError(f"train.jit_compile must be True, False or 'auto', got {jit!r}.")
    return precision, jit


def _with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A workdir's saved config over today's defaults (configs/base.py).

    Keys added to keras_ft since the run was trained take their defaults;
    keys that no longer exist are ignored with a warning.
    """
    from configs import base

    config = base.get_config()
    for key, value in _flatten(saved).items():
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            logging.warning("Ignoring config key %s of the saved run (unknown today).", key)
            continue
        if isinstance(node[leaf], tuple) and isinstance(value, list):
            value = tuple(value)
        node[leaf] = value
    return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with, over today's defaults.

    What every entry point that reuses a run (evaluate, export) must read:
    e.g. `data.resize`, the resize policy of training, validation and the
    export, is "resize" for runs from before the key existed.
    """
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{workdir} has no config.json: is it a keras_ft workdir?")
    with open(config_path) as f:
        return _with_defaults(json.load(f))


def load_trained(workdir: str) -> tuple[model_lib.Classifier, dict]:
    """The classifier of a workdir with its newest checkpoint's weights.

    Returns:
        The model (compiled, on the default strategy) and the checkpoint's
        state: `epoch`, `history`, `class_names`.
    """
    config = load_config(workdir)
    manager_dir = os.path.join(workdir, "checkpoints")
    paths = checkpoint.CheckpointManager(manager_dir).all() if os.path.isdir(manager_dir) else []
    if not paths:
        raise ValueError(f"{workdir} has no checkpoint yet: train first.")
    with open(os.path.join(paths[-1], checkpoint.STATE_FILE)) as f:
        class_names = json.load(f)["class_names"]
    stages = stages_lib.parse(config.freeze.stages)
    model = build_model(config, class_names, config.model.image_size, stages, 1)
    manager = checkpoint.CheckpointManager(
        manager_dir, **checkpoint.model_objects(model, model.snapshot_reference())
    )
    state = manager.restore_latest()
    if state is None:
        raise ValueError(f"No readable checkpoint in {manager_dir}.")
    return model, state


def _image_size(config: ml_collections.ConfigDict) -> int:
    return config.model.image_size or backbones.get(config.model.backbone).default_size


@dataclasses.dataclass
class Setup:
    """What a run is made of, before any training: see `setup`."""

    strategy: tf.distribute.Strategy
    dataset: data.ImageSet
    train_set: data.ImageSet
    val_set: data.ImageSet
    scan_report: validate.Report
    image_size: int
    batch: int
    steps_per_epoch: int
    stages: list
    model: model_lib.Classifier
    reference: list
    block_lr: list | None
    seed: int
    resize: str
    augment: augment_lib.Augment
    cache_images_mb: float = 0.0
    _sized: dict = dataclasses.field(default_factory=dict)

    def sized(self, images: data.ImageSet, training: bool) -> np.ndarray | None:
        """`images` decoded and sized once (`data.size_all`) if they fit in
        `cache_images_mb` (and training does not crop the originals)."""
        if training and self.augment.random_resized_crop:
            return None
        key = id(images)
        if key not in self._sized:
            need = len(images) * self.image_size**2 * 3 * 4
            if need > self.cache_images_mb * 2**20:
                if self.cache_images_mb:
                    logging.info(
                        "Not caching %d decoded images: %.0f MB > data.cache_images_mb=%g.",
                        len(images), need / 2**20, self.cache_images_mb,
                    )
                self._sized[key] = None
            else:
                start = time.perf_counter()
                self._sized[key] = data.size_all(images, self.image_size, self.resize)
                logging.info(
                    "Decoded and sized %d images once, kept in memory (%.1f MB, %.1fs).",
                    len(images), need / 2**20, time.perf_counter() - start,
                )
        return self._sized[key]

    def train_dataset(self, skip_batches: int = 0) -> tf.data.Dataset:
        """The run's training stream, `skip_batches` batches in."""
        return data.make_dataset(
            self.train_set, self.image_size, self.batch, training=True, seed=self.seed,
            skip_batches=skip_batches, resize=self.resize, augment=self.augment,
            one_hot=self.augment.mixes, sized=self.sized(self.train_set, True),
        )

    def eval_dataset(self, images: data.ImageSet) -> tf.data.Dataset:
        """One plain pass over `images`, sized and labelled as training was."""
        return data.make_dataset(
            images, self.image_size, self.batch, training=False, resize=self.resize,
            one_hot=self.augment.mixes, sized=self.sized(images, False),
        )


def setup(
    config: ml_collections.ConfigDict, strategy: tf.distribute.Strategy | None = None
) -> Setup:
    """Strategy, data and model of `config`: what `train` and `launch.lr_find`
    both start from. Creates the strategy once (unless given: `train` creates
    it first thing); only model building and `compile()` run under its scope."""
    if strategy is None:
        strategy = distribute.start(config.distribute)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:  # bitwise-repeatable kernels (the data order always is)
        tf.config.experimental.enable_op_determinism()
    image_size = _image_size(config)
    stages = stages_lib.parse(config.freeze.stages)
    resize = data.check_resize(config.data.resize)
    augment = augmentation(config)

    batch = config.train.global_batch_size
    distribute.check_batch_size(batch, strategy)
    logging.info("Strategy %s.", distribute.describe(strategy))
    precision, jit_compile = _precision(config)
    logging.info("Precision %s; XLA jit_compile=%s.", precision, jit_compile)
    rate = configured_rate(config)
    if rate != config.optimizer.learning_rate:
        logging.info(
            "Linear LR scaling: %g x %d x %d / %d = %g.", config.optimizer.learning_rate,
            config.train.global_batch_size, config.optimizer.accumulation_steps,
            config.optimizer.lr_base_batch_size, rate,
        )

    dataset, train_set, val_set, scan_report = load_splits(config.data, config.seed)
    for line in scan_report.lines():
        logging.info("%s", line)
    if len(train_set) < batch:
        raise ValueError(
            f"The training split has {len(train_set)} images, fewer than "
            f"train.global_batch_size={batch}; lower the batch size."
        )
    steps_per_epoch = config.train.steps_per_epoch or len(train_set) // batch
    _check_accumulation(config, steps_per_epoch, stages)
    logging.info(
        "Data %s: %d train / %d validation images (%s), %d classes (%s).",
        config.data.source, len(train_set), len(val_set),
        "the source's own split" if dataset.val_mask is not None
        else f"val_fraction {config.data.val_fraction}, seed {config.seed}",
        len(dataset.class_names), ", ".join(dataset.class_names[:10]),
    )
    logging.info("Images: %s to %d px; augmentation: %s.", resize, image_size, augment.describe())

    with strategy.scope():
        model = build_model(
            config, dataset.class_names, image_size, stages,
            config.train.epochs * steps_per_epoch,
        )
        reference = model.snapshot_reference()  # θ0: the weights as loaded
    block_lr = None
    if config.freeze.lr_decay != 1.0:
        num_blocks = len(backbones.block_map(model.backbone, config.model.backbone))
        block_lr = stages_lib.block_lr_multipliers(num_blocks, config.freeze.lr_decay)
    return Setup(
        strategy, dataset, train_set, val_set, scan_report, image_size, batch,
        steps_per_epoch, stages, model, reference, block_lr, config.seed, resize, augment,
        _cache_budget(config),
    )


def _check_accumulation(config, steps_per_epoch: int, stages: list) -> None:
    """`optimizer.accumulation_steps` N: updates must not straddle an epoch
    or a stage boundary (an accumulator of a variable that a stage freezes
    would keep its partial sum)."""
    n = config.optimizer.accumulation_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"optimizer.accumulation_steps must be an integer >= 1, got {n!r}.")
    if n == 1:
        return
    if steps_per_epoch % n:
        raise ValueError(
            f"optimizer.accumulation_steps={n} must divide the {steps_per_epoch} steps per "
            "epoch (set train.steps_per_epoch or the batch size), so that no update "
            "straddles an epoch."
        )
    bad = [s.describe() for s in stages if s.steps and s.steps % n]
    if bad:
        raise ValueError(
            f"optimizer.accumulation_steps={n} must divide every stage length in steps; "
            f"not {', '.join(bad)}."
        )
    if config.optimizer.learning_rate == "auto":
        raise ValueError(
            "optimizer.learning_rate='auto' runs the range test one update per batch: "
            "run it without accumulation (launch.lr_find), then set the rate."
        )
    logging.info(
        "Gradient accumulation: one update per %d batches of %d (effective batch %d).",
        n, config.train.global_batch_size, n * config.train.global_batch_size,
    )


def _cache_budget(config) -> float:
    mb = config.data.cache_images_mb
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 <= mb <= 1900:
        raise ValueError(
            f"data.cache_images_mb must be a number of megabytes in [0, 1900] (0 = off), "
            f"got {mb!r}."
        )
    return float(mb)


def reestimate_if_configured(config: ml_collections.ConfigDict, run: Setup) -> None:
    """BatchNorm policy "reestimate": statistics from training images, once."""
    if config.freeze.batchnorm != "reestimate":
        return
    used = freezing.reestimate_batchnorm(
        run.model, run.eval_dataset(run.train_set), config.freeze.reestimate_batches
    )
    logging.info("Re-estimated BatchNorm statistics on %d training batches.", used)


def _cached_epochs(config, stages: list, augment: augment_lib.Augment) -> int:
    """How many first epochs train on cached features (`data.cache_features`):
    those of a first stage that trains the head only, 0 if caching is off."""
    if not config.data.cache_features:
        return 0
    first = stages[0]
    if first.blocks != 0 or not first.epochs or config.freeze.method == "lora":
        raise ValueError(
            "data.cache_features=True caches the frozen backbone of a first stage "
            "that trains the head only for whole epochs, e.g. freeze.stages[0] = "
            f"dict(epochs=2, blocks=0); the first stage is {first.describe()!r}"
            + (" measured in steps" if first.steps else "")
            + (", method lora" if config.freeze.method == "lora" else "") + "."
        )
    features.check_cacheable(augment)
    return config.train.epochs if len(stages) == 1 else min(first.epochs, config.train.epochs)


def _restore(manager, run: Setup, has_checkpoints: bool) -> dict | None:
    """Restores the newest readable checkpoint; checks it belongs to this run."""
    state = manager.restore_latest()
    if state is None:
        if has_checkpoints:
            raise ValueError(
                f"No checkpoint in {manager.directory} is readable (see the warnings "
                "above); nothing was changed. Use --config.resume=False to start over "
                "(the old checkpoints are moved aside)."
            )
        return None
    if state["class_names"] != run.dataset.class_names:
        raise ValueError(
            f"Cannot resume from {state['path']}: it was trained on classes "
            f"{state['class_names']}, the data now has {run.dataset.class_names}."
        )
    if state["steps_per_epoch"] != run.steps_per_epoch:
        raise ValueError(
            f"Cannot resume from {state['path']}: it has {state['steps_per_epoch']} "
            f"steps per epoch, the data now gives {run.steps_per_epoch} (files were "
            "added or removed). Restore the data, or use --config.resume=False."
        )
    logging.info(
        "Resumed from %s: %d epoch(s) and %d step(s) done (global step %d), stage %s.",
        state["path"], state["epoch"], state["step"], state["global_step"], state["stage"],
    )
    return state


def train(
    config: ml_collections.ConfigDict, workdir: str, extra_callbacks: tuple = ()
) -> dict:
    """Runs (or resumes) the training job of `config` in `workdir`.

    While it runs, SIGTERM saves a checkpoint at the next step boundary and
    raises `checkpoint.Preempted` (see `keras_ft.preemption`).

    Args:
        config: the run's config (configs/base.py lists every key).
        workdir: the run's directory (layout: this module's docstring).
        extra_callbacks: more Keras callbacks for `fit()`, run after
            keras_ft's own (so after the step's checkpoint, if one is due).

    Returns:
        The final metrics, as written to `metrics.json`.

    Raises:
        checkpoint.Preempted: stopped by SIGTERM, after saving.
        callbacks.NonFiniteLoss, checkpoint.NonFiniteState: the loss or the
            weights became NaN or infinite; the last checkpoint is intact.
        ValueError: bad config, data or workdir.
    """
    # First: multi_worker must configure the runtime before any op runs.
    strategy = distribute.start(config.distribute)
    with preemption.Watch() as watch, distribute.output_dir(strategy, workdir) as out:
        return _train(config, workdir, out, strategy, watch, list(extra_callbacks))


def _train(
    config, workdir: str, out: str, strategy, watch: preemption.Watch, extra_callbacks: list
) -> dict:
    """`train`, reading the run from `workdir` and writing it to `out` (the
    same folder, except on a worker that is not the chief)."""
    # ------------------------------------------------------------------ config
    image_size = _image_size(config)
    stages_lib.parse(config.freeze.stages)  # bad values fail before any work
    data.check_resize(config.data.resize)
    augmentation(config)
    _precision(config)
    configured_rate(config)
    if config.optimizer.learning_rate == "auto" and distribute.num_workers(strategy) > 1:
        raise ValueError(
            "optimizer.learning_rate='auto' runs the range test on one worker: run "
            "`python -m launch.lr_find` with the same config once, then set "
            "--config.optimizer.learning_rate to its suggestion."
        )
    resolved = config.to_dict()
    resolved["model"]["image_size"] = image_size
    os.makedirs(out, exist_ok=True)
    checkpoints_dir = os.path.join(workdir, "checkpoints")
    has_checkpoints = os.path.isdir(checkpoints_dir) and any(
        n.startswith(checkpoint.PREFIX) for n in os.listdir(checkpoints_dir)
    )
    if config.resume and has_checkpoints:
        _check_resumable(workdir, resolved)
    elif not config.resume and out == workdir:
        _set_aside_old_run(workdir)
    _write_json(os.path.join(out, "config.json"), resolved)

    # ------------------------------------------------- strategy, data, model
    run = setup(config, strategy)
    model, batch = run.model, run.batch
    dataset, train_set, val_set = run.dataset, run.train_set, run.val_set
    stages, steps_per_epoch, block_lr = run.stages, run.steps_per_epoch, run.block_lr
    _write_json(os.path.join(out, "data_scan.json"), json.loads(run.scan_report.to_json()))
    val_ds = distribute.shard_by_data(run.eval_dataset(val_set))
    total_steps = config.train.epochs * steps_per_epoch // config.optimizer.accumulation_steps

    # ------------------------------------------------------------------ resume
    manager = checkpoint.CheckpointManager(
        os.path.join(out, "checkpoints"),
        keep=config.checkpoint.keep,
        read_directory=checkpoints_dir,  # every worker resumes from the chief's
        **checkpoint.model_objects(model, run.reference),
    )
    state = _restore(manager, run, has_checkpoints) if config.resume else None
    history = state["history"] if state else []
    epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    if state is None:  # a resumed run's checkpoint holds its statistics
        reestimate_if_configured(config, run)
    else:  # a constant rate is an optimizer variable: the config's, not the checkpoint's
        rate = learning_rate_schedule(config.optimizer, total_steps, configured_rate(config))
        if isinstance(rate, float):
            model.optimizer.learning_rate = rate

    # ------------------------------------------- learning rate "auto" (range test)
    if config.optimizer.learning_rate == "auto":
        lr_dir = os.path.join(workdir, "lr_find")
        if state is None:  # a fresh run: test the model as built, in stage 1
            freezing.apply_stage(
                model, stages[0], config.freeze.method, config.freeze.batchnorm, block_lr
            )
            found = lr_finder.find_learning_rate(
                model,
                run.train_dataset(),
                config.optimizer.lr_find.start_lr,
                config.optimizer.lr_find.end_lr,
                config.optimizer.lr_find.steps,
            )
            lr_finder.save(found, lr_dir, f"stage 1, {stages[0].describe()}")
            learning_rate = found.suggestion
        else:  # resuming: the rate the run started with
            learning_rate = lr_finder.load_suggestion(lr_dir)
        model.optimizer.learning_rate = learning_rate_schedule(
            config.optimizer, total_steps, learning_rate
        )
        model.make_train_function(force=True)  # the step was traced with the old rate
        logging.info(
            "optimizer.learning_rate=auto: %.4g, %s %s.", learning_rate,
            "found by the range test in" if state is None else "resumed from", lr_dir,
        )

    # --------------------------------------------------------------------- fit
    throughput = callbacks.Throughput(batch)
    history_path = os.path.join(out, "history.csv")

    class _WriteHistory(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            _write_history(history_path, history)

    schedule = freezing.StageSchedule(
        stages, config.freeze.method, config.freeze.batchnorm, block_lr, steps_per_epoch
    )
    progress = callbacks.ProgressLog(config.train.epochs)
    progress.steps_per_epoch = steps_per_epoch
    saver = checkpoint.TrainingCheckpoint(
        manager,
        history,
        steps_per_epoch,
        every_steps=config.checkpoint.every_steps,
        every_seconds=config.checkpoint.every_seconds,
        extra={"class_names": dataset.class_names, "seed": config.seed},
        preemption=watch,
        describe_stage=schedule.describe,
        agree=lambda flags: distribute.any_worker(strategy, flags),
    )
    stop_on_nan = callbacks.StopOnNonFiniteLoss()
    fit_callbacks = [
        schedule,
        freezing.BlockDrift(),
        stop_on_nan,  # before the save: a NaN step is never checkpointed
        throughput,
        keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")),
        progress,
        _WriteHistory(),
        saver,  # last: the epoch's logs are complete when it stores them
    ] + extra_callbacks
    if watch.requested:  # SIGTERM during start-up: nothing new to save
        raise checkpoint.Preempted(state["path"] if state else None, epoch * steps_per_epoch + step)

    cached_epochs = _cached_epochs(config, stages, run.augment)
    cache = None
    class_weight = None
    if config.data.class_weights:
        class_weight = validate.class_weights(train_set.labels, len(dataset.class_names))
        logging.info("Class weights (inverse frequency): %s.", ", ".join(
            f"{dataset.class_names[c]} {w:.3g}" for c, w in class_weight.items()))

    def fit(first_epoch: int, last_epoch: int, first_step: int, cached: bool) -> None:
        nonlocal cache
        # The training stream is a pure function of the seed: skipping the
        # batches already consumed continues it exactly where a run stopped.
        skip = first_epoch * steps_per_epoch + first_step
        if cached:  # the same stream, with the frozen backbone's cached features
            if cache is None:
                cache = features.compute(
                    model, train_set, val_set, image_size, batch, run.resize, run.augment,
                    one_hot=run.augment.mixes,
                )
            train_ds = features.training_stream(cache, batch, config.seed, skip, run.augment)
        else:
            train_ds = run.train_dataset(skip_batches=skip)
        train_ds = distribute.shard_by_data(train_ds)
        if cached_epochs:  # fresh step functions for features or images: a
            # retraced function relaxed to both would lose the input's rank
            model.make_train_function(force=True)
            model.make_test_function(force=True)
        for callback in (schedule, stop_on_nan, progress):
            callback.resume_at(first_step)
        saver.resume_at(first_step, state.get("metric_sums") if state else None)
        model.fit(
            train_ds,
            validation_data=(
                distribute.shard_by_data(features.validation_stream(cache, batch))
                if cached else val_ds
            ),
            epochs=last_epoch,
            initial_epoch=first_epoch,
            steps_per_epoch=steps_per_epoch - first_step,
            callbacks=fit_callbacks,
            class_weight=class_weight,
            shuffle=False,  # the stream is already shuffled, by seed and pass
            verbose=0,  # ProgressLog prints the lines that matter
        )

    if epoch < config.train.epochs:
        logging.info(
            "Training epochs %d..%d of %d, %d steps each%s.",
            epoch + 1, config.train.epochs, config.train.epochs, steps_per_epoch,
            f", starting at step {step + 1} of epoch {epoch + 1}" if step else "",
        )
        # In parts: the rest of an interrupted epoch on its own, then the
        # epochs on cached features, then those on images.
        while epoch < config.train.epochs:
            cached = epoch < cached_epochs
            end = epoch + 1 if step else cached_epochs if cached else config.train.epochs
            fit(epoch, end, step, cached)
            epoch, step = end, 0
    else:
        logging.info("All %d epochs are done; evaluating and exporting.", config.train.epochs)
    _write_history(history_path, history)

    # ---------------------------------------------------------- evaluate, export
    if cached_epochs:  # the test step may have been traced for features last
        model.make_test_function(force=True)
    results = model.evaluate(val_ds, verbose=0, return_dict=True)
    metrics = {
        "val_accuracy": float(results["accuracy"]),
        "val_loss": float(results["loss"]),
        # None when this invocation trained no step (the run was complete).
        "train_images_per_sec": throughput.images_per_sec if throughput.steps else None,
        "epochs": config.train.epochs,
        "steps": int(model.optimizer.iterations.numpy()),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "num_classes": len(dataset.class_names),
        "replicas": strategy.num_replicas_in_sync,
        "resumed_from": state["path"] if state else None,
        "weights_sha256": checkpoint.fingerprint(model),
    }
    if schedule.info is not None:
        metrics["trainable_params"] = schedule.info.trainable_params
        metrics["trainable_fraction"] = schedule.info.fraction
    if config.export.enabled:
        path = export.export_saved_model(
            model, os.path.join(out, "export"), dataset.class_names, image_size,
            resize=run.resize,
        )
        logging.info("Exported SavedModel to %s.", path)
    _write_json(os.path.join(out, "metrics.json"), metrics)
    logging.info("Final metrics: %s", json.dumps(metrics))
    return metrics
