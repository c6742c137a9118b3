"""A job: the data and the compiled model of a run spec, before training.

`assemble` is what `keras_ft.trainer.train` and `launch.lr_find` both start
from; `build_model` is what they and `load_trained` (`launch.evaluate`,
`launch.export`) build the model with. Only model building and `compile()`
run under the strategy's scope.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf
from absl import logging

from keras_ft import checkpoint, distribute, freezing, optim, precision, spec as spec_lib
from keras_ft import stages as stages_lib, tasks, workdir as workdir_lib


@dataclasses.dataclass
class Job:
    """What a run is made of, before any training: see `assemble`."""

    spec: spec_lib.RunSpec
    task: tasks.Task
    strategy: tf.distribute.Strategy
    data: tasks.TaskData
    model: keras.Model
    reference: list  # θ0, the weights as loaded (L2-SP, drift), checkpointed
    block_lr: list | None  # discriminative rate multipliers, top block first
    steps_per_epoch: int
    batchnorm: freezing.BatchNormPolicy  # freeze.batchnorm, resolved for this batch

    @property
    def batch(self) -> int:
        return self.spec.train.global_batch_size

    @property
    def total_steps(self) -> int:
        """The run's optimizer updates."""
        return self.spec.total_steps(self.steps_per_epoch)

    def apply_stage(self, index: int) -> freezing.StageInfo:
        """Puts the model in stage `index` of the schedule (`freezing.apply_stage`)."""
        f = self.spec.freeze
        return freezing.apply_stage(self.model, f.stages[index], f.method, self.batchnorm,
                                    self.block_lr)


def batchnorm_policy(spec: spec_lib.RunSpec, replicas: int) -> freezing.BatchNormPolicy:
    """`freeze.batchnorm` resolved for the examples each BatchNorm layer
    normalises per step: the batch per replica, or the global batch when
    `distribute.sync_batchnorm` computes statistics across replicas."""
    batch = spec.train.global_batch_size
    per_norm = batch if spec.distribute.sync_batchnorm else batch // replicas
    return freezing.resolve_batchnorm(spec.freeze.batchnorm, per_norm, spec.freeze.bn_momentum)


def build_model(
    spec: spec_lib.RunSpec, task: tasks.Task, class_names: list[str], total_updates: int
) -> keras.Model:
    """The task's model of `spec`, compiled with keras_ft's SGD (call under
    the strategy's scope). `total_updates` is the schedule's length."""
    previous = keras.mixed_precision.global_policy()
    policy, _ = precision.resolve(spec.train.precision, spec.model.backbone)
    keras.mixed_precision.set_global_policy(policy)  # for the layers built here
    try:
        model = task.build_model(spec, class_names)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if spec.distribute.sync_batchnorm:
        synced = freezing.synchronize_batchnorm(model)
        logging.info("Synchronized BatchNorm: %d layers use global-batch statistics.", synced)
    if spec.freeze.method == "lora":
        adapted = freezing.enable_lora(model, spec.freeze.lora_rank, spec.freeze.deepest)
        logging.info("LoRA rank %d on %d layers.", spec.freeze.lora_rank, adapted)
    model.l2sp_alpha = spec.optimizer.l2sp
    loss, metrics = task.loss_and_metrics(spec)
    model.compile(
        optimizer=make_optimizer(spec, total_updates),
        loss=loss,
        metrics=metrics,
        jit_compile=spec.train.jit_compile,
    )  # under mixed_float16, Keras wraps the optimizer in a LossScaleOptimizer
    if spec.optimizer.ema_decay:
        model.enable_ema(spec.optimizer.ema_decay)
    return model


def make_optimizer(spec: spec_lib.RunSpec, total_updates: int):
    """keras_ft's `optimizer.name` optimizer (`keras_ft.optim`: SGD or AdamW,
    both written out) at the schedule of `spec` over `total_updates`."""
    o = spec.optimizer
    common = dict(
        weight_decay=o.weight_decay,
        global_clipnorm=o.clip_norm or None,
        gradient_accumulation_steps=o.accumulation_steps if o.accumulation_steps > 1 else None,
    )
    rate = spec.learning_rate(total_updates)
    if o.name == "adamw":
        return optim.AdamW(rate, beta_1=o.beta_1, beta_2=o.beta_2, epsilon=o.epsilon, **common)
    return optim.SGD(rate, momentum=o.momentum, nesterov=o.nesterov, **common)


def assemble(spec: spec_lib.RunSpec, strategy: tf.distribute.Strategy | None = None) -> Job:
    """Data and compiled model of `spec`. Creates the strategy unless given
    (`trainer.train` creates it first thing, before any other TF work)."""
    if strategy is None:
        strategy = distribute.start(spec.distribute)
    keras.utils.set_random_seed(spec.seed)
    if spec.deterministic:  # bitwise-repeatable kernels (the data order always is)
        tf.config.experimental.enable_op_determinism()
    batch = distribute.check_batch_size(spec.train.global_batch_size, strategy)
    logging.info("Strategy %s.", distribute.describe(strategy))
    policy, why = precision.resolve(spec.train.precision, spec.model.backbone)
    if spec.train.precision == "auto":
        policy = f"{policy} ({why})"
    logging.info("Precision %s; XLA jit_compile=%s.", policy, spec.train.jit_compile)
    o = spec.optimizer
    if o.rate != o.learning_rate:
        logging.info(
            "Linear LR scaling: %g x %d x %d / %d = %g.", o.learning_rate, batch,
            o.accumulation_steps, o.lr_base_batch_size, o.rate,
        )

    task = tasks.get(spec.task)
    data = task.load_data(spec)
    for line in data.scan_report.lines():
        logging.info("%s", line)
    if data.train_size < batch:
        raise ValueError(
            f"The training split has {data.train_size} examples, fewer than "
            f"train.global_batch_size={batch}; lower the batch size."
        )
    steps_per_epoch = spec.train.steps_per_epoch or data.train_size // batch
    spec_lib.check_steps(spec, steps_per_epoch)
    if o.accumulation_steps > 1:
        logging.info(
            "Gradient accumulation: one update per %d batches of %d (effective batch %d).",
            o.accumulation_steps, batch, o.accumulation_steps * batch,
        )
    for line in data.describe():
        logging.info("%s", line)

    with strategy.scope():
        model = build_model(spec, task, data.class_names, spec.total_steps(steps_per_epoch))
        reference = model.snapshot_reference()  # θ0: the weights as loaded
    block_lr = None
    if spec.freeze.lr_decay != 1.0:
        num_blocks = len(model.block_map())
        block_lr = stages_lib.block_lr_multipliers(num_blocks, spec.freeze.lr_decay)
    bn = batchnorm_policy(spec, strategy.num_replicas_in_sync)
    logging.info("BatchNorm policy %s.", bn.describe())
    return Job(spec, task, strategy, data, model, reference, block_lr, steps_per_epoch, bn)


def reestimate_if_configured(job: Job) -> None:
    """BatchNorm policy "reestimate": statistics from training images, once."""
    if job.spec.freeze.batchnorm != "reestimate":
        return
    used = freezing.reestimate_batchnorm(
        job.model, job.data.statistics_stream(), job.spec.freeze.reestimate_batches
    )
    logging.info("Re-estimated BatchNorm statistics on %d training batches.", used)


def enter_final_stage(job: Job) -> None:
    """Puts the model in the freezing stage in force at the run's last step."""
    f = job.spec.freeze
    last = stages_lib.stage_index(
        f.stages, job.spec.train.epochs - 1, job.total_steps - 1, job.steps_per_epoch
    )
    job.apply_stage(last)


def enter_first_stage(job: Job) -> None:
    """Puts the model in the first freezing stage (what the range test measures)."""
    job.apply_stage(0)


def load_trained(
    workdir: str, which: str | None = None
) -> tuple[keras.Model, dict, spec_lib.RunSpec]:
    """The model of a workdir with the weights its run evaluates and exports.

    Those of the newest checkpoint, or of the best one (`checkpoint.keep_best`)
    when `which` (default: the run's `export.which`) is "best"; and with
    `optimizer.ema_decay`, their moving average.

    Returns:
        The model (compiled, on the default strategy), the checkpoint's state
        (`epoch`, `step`, `history`, `class_names`, `path`, ...) and the
        run's spec.
    """
    spec = spec_lib.resolve(workdir_lib.load_config(workdir))
    which = spec.export_which if which is None else which
    if which not in spec_lib.EXPORT_WHICH:
        raise ValueError(f"Unknown checkpoint choice {which!r}. Choose one of: last, best.")
    directory = os.path.join(workdir, workdir_lib.CHECKPOINTS)
    if which == "best":
        directory = os.path.join(directory, checkpoint.BEST)
    paths = checkpoint.CheckpointManager.all_in(directory)
    if not paths and which == "best":
        raise ValueError(
            f"{workdir} has no best checkpoint ({directory} is empty or missing): "
            "train with checkpoint.keep_best set, or use the last checkpoint."
        )
    if not paths:
        raise ValueError(f"{workdir} has no checkpoint yet: train first.")
    states = (_state_or_none(p) for p in reversed(paths))  # the newest readable one
    class_names = next((s["class_names"] for s in states if s and "class_names" in s), None)
    if class_names is None:
        raise ValueError(f"No readable checkpoint in {directory}.")
    model = build_model(spec, tasks.get(spec.task), class_names, 1)
    manager = checkpoint.CheckpointManager(
        directory, **checkpoint.model_objects(model, model.snapshot_reference())
    )
    state = manager.restore_latest()
    if state is None:
        raise ValueError(f"No readable checkpoint in {directory}.")
    if model.ema is not None:
        model.ema.exchange()  # the average is what the run evaluated and exported
    return model, state, spec


def _state_or_none(path: str) -> dict | None:
    try:
        return checkpoint.CheckpointManager.read_state(path)
    except (OSError, ValueError):
        return None
