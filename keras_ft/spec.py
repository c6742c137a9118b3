"""The run spec: a config resolved once into typed, checked values.

`resolve(config)` turns the ConfigDict of configs/base.py (or a workdir's
saved config over today's defaults) into a frozen `RunSpec`. Every value is
checked here, once, with an error that names the key and the valid choices;
derived values (the image size, the linearly scaled rate, the epochs that
train on cached features) are computed here and nowhere else. The trainer
and every `launch.*` script read the spec, never the raw keys.

    spec = keras_ft.spec.resolve(configs.quickstart.get_config())
    spec.model.image_size         # 97
    spec.optimizer.rate           # 0.01 (after lr_scaling)
    spec.freeze.stages[1]         # Stage(epochs=4, blocks=3, lr_scale=0.1)

What depends on the data (steps per epoch, and so the checks of
`optimizer.accumulation_steps` against it) is checked when the data is
loaded (`check_steps`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from keras_ft import augment as augment_lib
from keras_ft import backbones, checks, data as data_lib, distribute, freezing, recipe, schedules
from keras_ft import stages as stages_lib, validate

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")  # auto: keras_ft.precision
OPTIMIZERS = ("sgd", "adamw")
TEXT_TASKS = ("text_classification",)  # tasks whose model.backbone is a text encoder
LR_SCALING = ("none", "linear")
PROGRESS = ("auto", "bar", "log")
EXPORT_WHICH = ("last", "best")


# ---------------------------------------------------------------- the spec


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    backbone: str  # registry name (keras_ft.backbones), or a text encoder (keras_ft.text_backbones)
    weights: str | None  # "imagenet", a named offline source, a path, "pretrained"
    #   (a text encoder's own); None = random
    weights_sha256: str | None
    image_size: int  # resolved: the backbone's default when the config says 0 (0 for text)
    dropout: float
    fold_dead_channels: bool


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    split: str = "train"
    val_split: str = ""
    data_dir: str = ""
    download: bool = False
    image_key: str = "image"
    label_key: str = "label"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    source: str
    val_fraction: float
    num_classes: int  # 0 = from the data
    train_per_class: int  # 0 = every training image
    tfds: TfdsSpec
    bad_files: str
    resize: str
    augment: augment_lib.Augment
    cache_images_mb: float
    pipeline: str  # "auto", "memory" or "stream" (keras_ft.data.PIPELINES)
    class_weights: bool
    cache_features: bool
    max_length: int  # text: tokens per example, [CLS] and [SEP] included


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    global_batch_size: int
    epochs: int
    steps_per_epoch: int  # 0 = one pass over the training set
    precision: str
    jit_compile: bool | str
    fail_at_chance: bool
    loss_spike_factor: float
    max_recoveries: int
    recovery_lr_factor: float
    label_smoothing: float  # 0 = off
    early_stopping_patience: int  # epochs without a new best; 0 = off
    progress: str  # "auto", "bar" or "log"


@dataclasses.dataclass(frozen=True)
class LrFindSpec:
    start_lr: float
    end_lr: float
    steps: int


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    name: str  # "sgd" or "adamw"
    learning_rate: float | str  # as configured: a number or "auto"
    rate: float | str  # the peak rate after `lr_scaling` ("auto" stays "auto")
    lr_scaling: str
    lr_base_batch_size: int
    momentum: float
    nesterov: bool
    weight_decay: float
    accumulation_steps: int
    clip_norm: float
    l2sp: float
    lr_find: LrFindSpec
    ema_decay: float  # 0 = off
    beta_1: float  # adamw
    beta_2: float
    epsilon: float

    @property
    def auto(self) -> bool:
        """Whether the rate comes from the range test (`learning_rate="auto"`)."""
        return self.learning_rate == "auto"


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    name: str
    warmup_steps: int
    warmup_fraction: float
    decay_boundaries: tuple[float, ...]
    decay_factor: float
    stlr_cut_frac: float
    stlr_ratio: float


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
    stages: tuple[stages_lib.Stage, ...]
    batchnorm: str
    bn_momentum: float
    reestimate_batches: int
    precise_bn: str
    precise_bn_batches: int
    method: str
    lora_rank: int
    lr_decay: float

    @property
    def deepest(self) -> int:
        """The most blocks any stage trains (-1 = all)."""
        return -1 if any(s.blocks == -1 for s in self.stages) else max(s.blocks for s in self.stages)


@dataclasses.dataclass(frozen=True)
class DistributeSpec:
    strategy: str
    cpu_devices: int
    sync_batchnorm: bool


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    keep: int
    every_steps: int
    every_seconds: float
    keep_best: str  # a metric logged each epoch; "" = off

    @property
    def monitor(self) -> str:
        """What early stopping watches: keep_best's metric, else val_loss."""
        return self.keep_best or "val_loss"


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run's config, checked and resolved (see the module docstring)."""

    task: str
    seed: int
    resume: bool
    deterministic: bool
    model: ModelSpec
    data: DataSpec
    train: TrainSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    freeze: FreezeSpec
    distribute: DistributeSpec
    checkpoint: CheckpointSpec
    export: bool
    export_which: str  # "last" or "best": the weights evaluated and exported
    cached_epochs: int  # first epochs trained on cached features (0 = none)
    resolved: dict = dataclasses.field(compare=False, repr=False)  # for config.json
    # The task's own config section, checked (`Task.resolve_options`), e.g.
    # detection's anchors and head; None for a task without one.
    task_options: object = None

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run's optimizer updates (batches / accumulation steps), at least 1."""
        batches = self.train.epochs * steps_per_epoch
        return max(1, batches // self.optimizer.accumulation_steps)

    def learning_rate(self, total_updates: int, peak: float | None = None):
        """The optimizer's learning rate: a float or a `keras_ft.schedules`
        object over `total_updates` (see `schedules.create`). `peak` replaces
        the configured rate (the range test's suggestion for "auto")."""
        return schedules.create(
            self.schedule.name,
            self.optimizer.rate if peak is None else peak,
            total_updates,
            warmup_steps=self.schedule.warmup_steps,
            warmup_fraction=self.schedule.warmup_fraction,
            decay_boundaries=self.schedule.decay_boundaries,
            decay_factor=self.schedule.decay_factor,
            stlr_cut_frac=self.schedule.stlr_cut_frac,
            stlr_ratio=self.schedule.stlr_ratio,
            as_schedule=self.optimizer.auto,  # the same optimizer variables before
            #   and after the range test's suggestion replaces the placeholder
        )


def resolve(config: ml_collections.ConfigDict | dict) -> RunSpec:
    """Checks every value of `config` once and returns the run's `RunSpec`.

    Args:
        config: a ConfigDict with the keys of configs/base.py, or a saved
            dict (read over today's defaults, old key names mapped).

    Raises:
        ValueError: the first bad value, naming its key and the valid choices.
    """
    from keras_ft import tasks, workdir  # tasks import this module's types

    if not isinstance(config, ml_collections.ConfigDict):
        config = workdir.with_defaults(config)
    c = config
    task = checks.choice(c.task, "task", tasks.names())
    seed = checks.integer(c.seed, "seed", 0, 2**31 - 1)

    text = task in TEXT_TASKS
    weights = c.model.weights
    weights = None if weights is None or str(weights).lower() == "none" else checks.text(weights, "model.weights")
    if text:
        backbone = _text_backbone(c.model.backbone, weights)
    else:
        backbone = _image_backbone(c.model.backbone, task)
    image_size = checks.integer(
        c.model.image_size, "model.image_size", 0, 4096, note=" (0 = the backbone's default)"
    )
    model = ModelSpec(
        backbone=backbone,
        weights=weights,
        weights_sha256=checks.text(c.model.weights_sha256, "model.weights_sha256") or None,
        # checked with the batch
        image_size=0 if text else image_size or backbones.get(backbone).default_size,
        dropout=checks.number(c.model.dropout, "model.dropout", 0, 1, open_high=True),
        fold_dead_channels=checks.boolean(c.model.fold_dead_channels, "model.fold_dead_channels"),
    )

    data = resolve_data(c.data)
    if data.cache_features and not tasks.get(task).caches_features:
        raise ValueError(
            f"data.cache_features caches an image backbone's features for a classifier's head; "
            f"task '{task}' has none to cache: set data.cache_features=False.")
    if data.pipeline == "stream" and not tasks.get(task).streams:
        raise ValueError(
            f"data.pipeline='stream' reads images by index for image classification; task "
            f"'{task}' holds its examples in memory: set data.pipeline='auto' or 'memory'.")
    if text:
        _check_text_data(data, backbone)
    if task == "semantic_segmentation":
        a = data.augment
        extra = [name for name, on in (("random_resized_crop", a.random_resized_crop),
                                       ("randaugment_ops", a.randaugment_ops), ("mixup", a.mixup),
                                       ("cutmix", a.cutmix)) if on]
        if extra:
            raise ValueError(
                f"data.augment.{extra[0]} is not applied to masks: segmentation augments with "
                "the joint left-right flip only (data.augment.flip); turn it off.")

    t = c.train
    jit = t.jit_compile
    if not (isinstance(jit, bool) or jit == "auto"):
        raise ValueError(f"train.jit_compile must be True, False or 'auto', got {jit!r}.")
    train = TrainSpec(
        global_batch_size=checks.integer(t.global_batch_size, "train.global_batch_size", 1),
        epochs=checks.integer(t.epochs, "train.epochs", 1),
        steps_per_epoch=checks.integer(t.steps_per_epoch, "train.steps_per_epoch", 0,
                             note=" (0 = one pass over the training set)"),
        precision=checks.choice(t.precision, "train.precision", PRECISIONS),
        jit_compile=jit,
        fail_at_chance=checks.boolean(t.fail_at_chance, "train.fail_at_chance"),
        loss_spike_factor=checks.number(t.loss_spike_factor, "train.loss_spike_factor", 0),
        max_recoveries=checks.integer(t.max_recoveries, "train.max_recoveries", 0),
        recovery_lr_factor=checks.number(
            t.recovery_lr_factor, "train.recovery_lr_factor", 0, 1, open_low=True, open_high=True
        ),
        label_smoothing=checks.number(
            t.label_smoothing, "train.label_smoothing", 0, 1, open_high=True, note=" (0 = off)"
        ),
        early_stopping_patience=checks.integer(
            t.early_stopping_patience, "train.early_stopping_patience", 0,
            note=" (epochs without a new best; 0 = off)",
        ),
        progress=checks.choice(t.progress, "train.progress", PROGRESS),
    )
    if not text:
        b = backbones.get(backbone)
        checks.image_size(model.image_size, backbone, b.min_size, b.default_size,
                          train.global_batch_size, workers=distribute.cluster_size())

    o = c.optimizer
    rate = o.learning_rate
    if rate != "auto":
        if not (checks.is_number(rate) and rate > 0):
            raise ValueError(
                f"optimizer.learning_rate must be a positive number or 'auto', got {rate!r}."
            )
        rate = float(rate)
    accumulation = checks.integer(o.accumulation_steps, "optimizer.accumulation_steps", 1)
    scaling = checks.choice(o.lr_scaling, "optimizer.lr_scaling", LR_SCALING)
    base_batch = checks.integer(o.lr_base_batch_size, "optimizer.lr_base_batch_size", 1)
    finder = LrFindSpec(
        start_lr=checks.number(o.lr_find.start_lr, "optimizer.lr_find.start_lr", 0, open_low=True),
        end_lr=checks.number(o.lr_find.end_lr, "optimizer.lr_find.end_lr", 0, open_low=True),
        steps=checks.integer(o.lr_find.steps, "optimizer.lr_find.steps", 2),
    )
    if finder.end_lr <= finder.start_lr:
        raise ValueError(
            f"optimizer.lr_find.end_lr ({finder.end_lr:g}) must be above optimizer.lr_find.start_lr "
            f"({finder.start_lr:g})."
        )
    optimizer = OptimizerSpec(
        name=checks.choice(o.name, "optimizer.name", OPTIMIZERS),
        learning_rate=rate,
        rate=rate if rate == "auto" or scaling == "none" else recipe.linear_scaled_rate(
            rate, train.global_batch_size * accumulation, base_batch),
        lr_scaling=scaling,
        lr_base_batch_size=base_batch,
        momentum=checks.number(o.momentum, "optimizer.momentum", 0, 1, open_high=True),
        nesterov=checks.boolean(o.nesterov, "optimizer.nesterov"),
        weight_decay=checks.number(o.weight_decay, "optimizer.weight_decay", 0),
        accumulation_steps=accumulation,
        clip_norm=checks.number(o.clip_norm, "optimizer.clip_norm", 0, note=" (0 = off)"),
        l2sp=checks.number(o.l2sp, "optimizer.l2sp", 0, note=" (0 = off)"),
        lr_find=finder,
        ema_decay=checks.number(o.ema_decay, "optimizer.ema_decay", 0, 1, open_high=True,
                                note=" (e.g. 0.999; 0 = off)"),
        beta_1=checks.number(o.beta_1, "optimizer.beta_1", 0, 1, open_high=True),
        beta_2=checks.number(o.beta_2, "optimizer.beta_2", 0, 1, open_high=True),
        epsilon=checks.number(o.epsilon, "optimizer.epsilon", 0, open_low=True),
    )
    if optimizer.auto and accumulation > 1:
        raise ValueError(
            "optimizer.learning_rate='auto' runs the range test one update per batch: "
            "run it without accumulation (launch.lr_find), then set the rate."
        )

    s = c.schedule
    schedule = ScheduleSpec(
        name=checks.choice(s.name, "schedule.name", schedules.NAMES),
        warmup_steps=checks.integer(s.warmup_steps, "schedule.warmup_steps", 0),
        warmup_fraction=checks.number(s.warmup_fraction, "schedule.warmup_fraction", 0, 1,
                                      open_high=True, note=" (0 = off)"),
        decay_boundaries=checks.increasing_fractions(s.decay_boundaries, "schedule.decay_boundaries"),
        decay_factor=checks.number(s.decay_factor, "schedule.decay_factor", 0, 1, open_low=True),
        stlr_cut_frac=checks.number(s.stlr_cut_frac, "schedule.stlr_cut_frac", 0, 1,
                                    open_low=True, open_high=True),
        stlr_ratio=checks.number(s.stlr_ratio, "schedule.stlr_ratio", 1),
    )
    # Builds it once over a nominal run: a bad combination or parameter fails
    # here, before any work; the real length is checked when the data is known.
    schedules.create(schedule.name, 1.0, 10**9, **_schedule_options(schedule))

    f = c.freeze
    freeze = FreezeSpec(
        stages=tuple(stages_lib.parse(f.stages)),
        batchnorm=checks.choice(f.batchnorm, "freeze.batchnorm", freezing.BN_POLICIES),
        bn_momentum=checks.number(f.bn_momentum, "freeze.bn_momentum", 0, 1, open_high=True,
                                  note=" (0 = each layer's own)"),
        reestimate_batches=checks.integer(f.reestimate_batches, "freeze.reestimate_batches", 1),
        precise_bn=checks.choice(f.precise_bn, "freeze.precise_bn", freezing.PRECISE_BN),
        precise_bn_batches=checks.integer(f.precise_bn_batches, "freeze.precise_bn_batches", 1),
        method=checks.choice(f.method, "freeze.method", freezing.METHODS),
        lora_rank=checks.integer(f.lora_rank, "freeze.lora_rank", 1),
        lr_decay=checks.number(f.lr_decay, "freeze.lr_decay", 0, 1, open_low=True),
    )
    if text and freeze.method == "bn_only":
        raise ValueError(freezing.BN_ONLY_WITHOUT_BATCHNORM)
    bad = [s.describe() for s in freeze.stages if s.steps and s.steps % accumulation]
    if bad:
        raise ValueError(
            f"optimizer.accumulation_steps={accumulation} must divide every stage length "
            f"in steps; not {', '.join(bad)}."
        )

    dist = DistributeSpec(
        strategy=checks.choice(c.distribute.strategy, "distribute.strategy", distribute.STRATEGIES),
        cpu_devices=checks.integer(c.distribute.cpu_devices, "distribute.cpu_devices", 0, 64),
        sync_batchnorm=checks.boolean(c.distribute.sync_batchnorm, "distribute.sync_batchnorm"),
    )
    ckpt = CheckpointSpec(
        keep=checks.integer(c.checkpoint.keep, "checkpoint.keep", 1),
        every_steps=checks.integer(c.checkpoint.every_steps, "checkpoint.every_steps", 0, note=" (0 = off)"),
        every_seconds=checks.number(c.checkpoint.every_seconds, "checkpoint.every_seconds", 0,
                              note=" (0 = off)"),
        keep_best=_logged_metric(c.checkpoint.keep_best, tasks.get(task).logged_metrics()),
    )
    export_which = checks.choice(c.export.which, "export.which", EXPORT_WHICH)
    if export_which == "best" and not ckpt.keep_best:
        raise ValueError(
            "export.which='best' exports the best checkpoint: set checkpoint.keep_best "
            "to the metric that chooses it (e.g. 'val_loss'), or use export.which='last'."
        )

    resolved = config.to_dict()
    resolved["model"]["image_size"] = model.image_size
    task_plugin = tasks.get(task)
    # Every task's own section is checked, used or not: a bad value in a
    # config.json is a bad config whichever task reads it.
    options = {name: tasks.get(name).resolve_options(c) for name in tasks.names()}
    spec = RunSpec(
        task=task,
        seed=seed,
        resume=checks.boolean(c.resume, "resume"),
        deterministic=checks.boolean(c.deterministic, "deterministic"),
        model=model,
        data=data,
        train=train,
        optimizer=optimizer,
        schedule=schedule,
        freeze=freeze,
        distribute=dist,
        checkpoint=ckpt,
        export=checks.boolean(c.export.enabled, "export.enabled"),
        export_which=export_which,
        cached_epochs=_cached_epochs(data, freeze, train.epochs),
        resolved=resolved,
        task_options=options[task],
    )
    task_plugin.check(spec)
    return spec


def resolve_data(d) -> DataSpec:
    """The checked `data` sub-config: a ConfigDict, or a saved dict read over
    today's defaults (old key names mapped), as `launch.evaluate` needs."""
    if not isinstance(d, ml_collections.ConfigDict):
        from keras_ft import workdir

        d = workdir.with_defaults({"data": dict(d)}).data
    return DataSpec(
        source=checks.text(d.source, "data.source"),
        val_fraction=checks.number(d.val_fraction, "data.val_fraction", 0, 1, open_low=True, open_high=True),
        num_classes=checks.integer(d.num_classes, "data.num_classes", 0, note=" (0 = from the data)"),
        train_per_class=checks.integer(d.train_per_class, "data.train_per_class", 0,
                                       note=" (0 = all)"),
        tfds=TfdsSpec(
            split=checks.text(d.tfds.split, "data.tfds.split"),
            val_split=checks.text(d.tfds.val_split, "data.tfds.val_split"),
            data_dir=checks.text(d.tfds.data_dir, "data.tfds.data_dir"),
            download=checks.boolean(d.tfds.download, "data.tfds.download"),
            image_key=checks.text(d.tfds.image_key, "data.tfds.image_key"),
            label_key=checks.text(d.tfds.label_key, "data.tfds.label_key"),
        ),
        bad_files=checks.choice(d.bad_files, "data.bad_files", validate.POLICIES),
        resize=data_lib.check_resize(d.resize),
        augment=augment_lib.Augment.from_config(d.augment),
        cache_images_mb=checks.number(d.cache_images_mb, "data.cache_images_mb", 0, 1900,
                                note=" of megabytes (0 = off)"),
        pipeline=checks.choice(d.pipeline, "data.pipeline", data_lib.PIPELINES),
        class_weights=checks.boolean(d.class_weights, "data.class_weights"),
        cache_features=checks.boolean(d.cache_features, "data.cache_features"),
        max_length=checks.integer(d.max_length, "data.max_length", 3, 8192,
                                  note=" of tokens ([CLS] and [SEP] included)"),
    )


def _image_backbone(name, task: str) -> str:
    """`model.backbone` of an image task: a registry name."""
    name = checks.text(name, "model.backbone")
    if name not in backbones.names():
        from keras_ft import text_backbones

        if name == text_backbones.MINILM or name.startswith(text_backbones.PRESET_PREFIX):
            raise ValueError(
                f"model.backbone='{name}' is a text encoder; task '{task}' needs an image "
                f"backbone ({', '.join(backbones.names())}), or set task='text_classification'."
            )
    return backbones.get(name).name  # lists the valid names


def _text_backbone(name, weights: str | None) -> str:
    """`model.backbone` of a text task, and its `model.weights`."""
    from keras_ft import text_backbones

    name = text_backbones.check(checks.text(name, "model.backbone"))
    if weights not in (None, "pretrained"):
        raise ValueError(
            f"model.weights={weights!r} is for image backbones: a text encoder takes "
            "'pretrained' (its preset's weights) or 'none' (random init, same shapes)."
        )
    return name


def _check_text_data(data: DataSpec, backbone: str) -> None:
    """What an image-only data option or a too-long `data.max_length` would
    get wrong on a text task: errors before any work."""
    from keras_ft import text_backbones

    if data.source.split(":", 1)[0] == "tfds":
        raise ValueError(f"data.source={data.source!r}: text data come from folder:, csv:, "
                         "tsv: or fortunes: sources (keras_ft.text_sources).")
    limit = text_backbones.position_limit(backbone)
    if limit is not None and data.max_length > limit:
        raise ValueError(
            f"data.max_length={data.max_length} is above the {limit} positions of "
            f"model.backbone='{backbone}'; set data.max_length <= {limit}."
        )


def _logged_metric(value, logged: list[str]) -> str:
    """`checkpoint.keep_best`: "" or one of the metrics `fit()` logs each epoch."""
    value = checks.text(value, "checkpoint.keep_best")
    if value and value not in logged:
        raise ValueError(
            f"checkpoint.keep_best={value!r} is not a metric logged each epoch. Choose one "
            f"of: {', '.join(logged)} (or '' for none)."
        )
    return value


def _schedule_options(schedule: ScheduleSpec) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(schedule).items() if k != "name"}


def _cached_epochs(data: DataSpec, freeze: FreezeSpec, epochs: int) -> int:
    """How many first epochs train on cached features (`data.cache_features`):
    those of a first stage that trains the head only, 0 if caching is off."""
    if not data.cache_features:
        return 0
    first = freeze.stages[0]
    if first.blocks != 0 or not first.epochs or freeze.method == "lora":
        raise ValueError(
            "data.cache_features=True caches the frozen backbone of a first stage "
            "that trains the head only for whole epochs, e.g. freeze.stages[0] = "
            f"dict(epochs=2, blocks=0); the first stage is {first.describe()!r}"
            + (" measured in steps" if first.steps else "")
            + (", method lora" if freeze.method == "lora" else "") + "."
        )
    from keras_ft import features

    features.check_cacheable(data.augment)
    return epochs if len(freeze.stages) == 1 else min(first.epochs, epochs)


def check_steps(spec: RunSpec, steps_per_epoch: int) -> None:
    """What the data decides: updates must not straddle an epoch (an
    accumulator of a variable that a stage freezes would keep its partial
    sum), and the schedule's warmup must fit in the run."""
    n = spec.optimizer.accumulation_steps
    if steps_per_epoch % n:
        raise ValueError(
            f"optimizer.accumulation_steps={n} must divide the {steps_per_epoch} steps per "
            "epoch (set train.steps_per_epoch or the batch size), so that no update "
            "straddles an epoch."
        )
    spec.learning_rate(spec.total_steps(steps_per_epoch), peak=1.0)
