"""The training recipe, top to bottom: spec -> strategy -> workdir -> data and
model -> resume -> learning rate -> fit -> evaluate -> export.

This is the only module that reads a whole run: the config is resolved once
into a `keras_ft.spec.RunSpec`, and everything called from here takes
explicit arguments or one part of the spec. What is specific to a task (its
data, head, loss, metrics and export) comes from `keras_ft.tasks`; the
recipe is the same for every task. The workdir's layout and its resume
rules are `keras_ft.workdir`'s.

    metrics = keras_ft.trainer.train(configs.quickstart.get_config(), "/tmp/qs")

`run` does the same and returns the trained model too (`Result`); it is
what `keras_ft.fine_tune` calls.
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import ml_collections
from absl import logging

from keras_ft import best as best_lib, callbacks, checkpoint, distribute, freezing
from keras_ft import job as job_lib, lr_stages
from keras_ft import ema as ema_lib, health, preemption, progress, spec as spec_lib
from keras_ft import workdir as workdir_lib


@dataclasses.dataclass
class Result:
    """What a finished run leaves, besides its workdir.

    Attributes:
        metrics: the final metrics, as written to `metrics.json`.
        model: the trained model, with the weights that were evaluated and
            exported (the moving average with `optimizer.ema_decay`, the best
            checkpoint's with `export.which="best"`).
        history: one dict of logs per epoch, as in `history.csv`.
        workdir: the run's directory.
        export_path: the SavedModel folder, or None (`export.enabled=False`).
        spec: the run's resolved `keras_ft.spec.RunSpec`.
    """

    metrics: dict
    model: keras.Model
    history: list[dict]
    workdir: str
    export_path: str | None
    spec: spec_lib.RunSpec


def train(
    config: ml_collections.ConfigDict, workdir: str, extra_callbacks: tuple = ()
) -> dict:
    """Runs (or resumes) the training job of `config` in `workdir`; returns
    its final metrics (`run(...).metrics`; see `run`)."""
    return run(config, workdir, extra_callbacks).metrics


def run(
    config: ml_collections.ConfigDict, workdir: str, extra_callbacks: tuple = ()
) -> Result:
    """Runs (or resumes) the training job of `config` in `workdir`.

    While it runs, SIGTERM saves a checkpoint at the next step boundary and
    raises `checkpoint.Preempted` (see `keras_ft.preemption`).

    Args:
        config: the run's config (configs/base.py lists every key).
        workdir: the run's directory (layout: `keras_ft.workdir`).
        extra_callbacks: more Keras callbacks for `fit()`, run after
            keras_ft's own (so after the step's checkpoint, if one is due).

    Returns:
        The `Result`: final metrics (as written to `metrics.json`), the
        trained model, the history, the export's path.

    Raises:
        checkpoint.Preempted: stopped by SIGTERM, after saving.
        health.TooManySpikes, checkpoint.NonFiniteState: the loss spiked or
            became NaN again after `train.max_recoveries` rollbacks, or a
            weight to be saved is not finite; the last checkpoint is intact.
        health.ChanceLevel: the final result is at chance level; nothing
            was exported.
        ValueError: bad config, data or workdir.
    """
    spec = spec_lib.resolve(config)  # every value checked before any work
    progress.quiet_framework_logs()
    # Then the strategy: multi_worker must configure the runtime before any op runs.
    strategy = distribute.start(spec.distribute)
    with preemption.Watch() as watch, distribute.output_dir(strategy, workdir) as out:
        return _run(spec, workdir, out, strategy, watch, list(extra_callbacks))


def _run(spec, workdir: str, out: str, strategy, watch, extra_callbacks: list) -> Result:
    """`train`, reading the run from `workdir` and writing it to `out` (the
    same folder, except on a worker that is not the chief)."""
    # ----------------------------------------------------------------- workdir
    if spec.optimizer.auto and distribute.num_workers(strategy) > 1:
        raise ValueError(
            "optimizer.learning_rate='auto' runs the range test on one worker: run "
            "`python -m launch.lr_find` with the same config once, then set "
            "--config.optimizer.learning_rate to its suggestion."
        )
    has_checkpoints = workdir_lib.start(workdir, out, spec.resolved, spec.resume)
    progress.set_mode(progress.choose(spec.train.progress, distribute.is_chief(strategy)))

    # ---------------------------------------------------------- data and model
    job = job_lib.assemble(spec, strategy)
    model, data = job.model, job.data
    workdir_lib.write_json(
        os.path.join(out, workdir_lib.SCAN_FILE), json.loads(data.scan_report.to_json())
    )

    # ------------------------------------------------------------------ resume
    manager = checkpoint.CheckpointManager(
        os.path.join(out, workdir_lib.CHECKPOINTS),
        keep=spec.checkpoint.keep,
        read_directory=os.path.join(workdir, workdir_lib.CHECKPOINTS),  # the chief's
        **checkpoint.model_objects(model, job.reference),
    )
    state = _restore(manager, job, has_checkpoints) if spec.resume else None
    history = state["history"] if state else []
    best = None  # the monitored metric's best so far (keep_best, early stopping)
    if spec.checkpoint.keep_best or spec.train.early_stopping_patience:
        best = best_lib.BestMetric(spec.checkpoint.monitor, spec.train.early_stopping_patience)
        best.restore(state)
    epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    if state is None:  # a resumed run's checkpoint holds its statistics
        job_lib.reestimate_if_configured(job)
    else:  # a constant rate is an optimizer variable: the config's, not the checkpoint's
        rate = spec.learning_rate(job.total_steps)
        if isinstance(rate, float):
            model.optimizer.learning_rate = rate

    # --------------------------------------- learning rate "auto" (range test)
    auto_factors = {}
    if spec.optimizer.auto:
        auto_factors = _set_automatic_rate(job, os.path.join(workdir, "lr_find"), fresh=state is None)

    # --------------------------------------------------------------------- fit
    schedule = freezing.StageSchedule(
        list(spec.freeze.stages), spec.freeze.method, job.batchnorm, job.block_lr,
        job.steps_per_epoch, statistics=data.statistics_stream,
        statistics_batches=spec.freeze.precise_bn_batches,
    )
    schedule.restore(state)
    throughput = callbacks.Throughput(job.batch)
    bar = progress.mode() == "bar"
    # With the bar, the log keeps its one line per epoch (stderr, for the record).
    log = callbacks.ProgressLog(spec.train.epochs, every_seconds=float("inf") if bar else 30.0)
    log.steps_per_epoch = job.steps_per_epoch
    shown = [log]
    if bar:
        shown.append(callbacks.ProgressBar(spec.train.epochs, job.batch))
        shown[-1].steps_per_epoch = job.steps_per_epoch
    guard = health.LossGuard(
        spec.train.loss_spike_factor, job.steps_per_epoch,
        regime=lambda: schedule.batch_statistics,
    )
    guard.restore(state)
    recoveries = health.Recoveries(
        os.path.join(out, workdir_lib.CHECKPOINTS), spec.train.max_recoveries,
        spec.train.recovery_lr_factor,
    )
    if state is not None:
        recoveries.load(os.path.join(workdir, workdir_lib.CHECKPOINTS))
    schedule.lr_factors = _stage_factors(auto_factors, recoveries)
    precise_bn = freezing.PreciseBatchNorm(
        data.statistics_stream, spec.freeze.precise_bn_batches, spec.train.epochs,
        when=spec.freeze.precise_bn, steps_per_epoch=job.steps_per_epoch,
    )
    saver = checkpoint.TrainingCheckpoint(
        manager,
        history,
        job.steps_per_epoch,
        every_steps=spec.checkpoint.every_steps,
        every_seconds=spec.checkpoint.every_seconds,
        extra={"class_names": data.class_names, "seed": spec.seed},
        preemption=watch,
        describe_stage=schedule.describe,
        agree=lambda flags: distribute.any_worker(strategy, flags),
        more_state=lambda: dict(guard.state(), recoveries=recoveries.events, **schedule.state()),
        best=best,
        keep_best=bool(spec.checkpoint.keep_best),
    )
    saver.repair_best()
    history_path = os.path.join(out, workdir_lib.HISTORY_FILE)
    fit_callbacks = [
        schedule,
        freezing.BlockDrift(),
        guard,  # before the save: a spiking or NaN step is never checkpointed
        precise_bn,  # after an epoch's last step: before its validation and save
        *([ema_lib.ValidateAverage(model.ema)] if model.ema is not None else []),
        *job.task.epoch_callbacks(model, data),  # the task's val_ metrics, before their readers
        throughput,
        keras.callbacks.TensorBoard(os.path.join(out, workdir_lib.TENSORBOARD)),
        *shown,
        saver,  # after the metrics' callbacks: the epoch's logs are complete
        callbacks.WriteHistory(history_path, history),  # after the saver adds the epoch
    ] + extra_callbacks
    resumable = (schedule, guard, precise_bn, *shown)
    if watch.requested:  # SIGTERM during start-up: nothing new to save
        raise checkpoint.Preempted(
            state["path"] if state else None, epoch * job.steps_per_epoch + step
        )

    if state is None:  # the start, as a checkpoint: a rollback target
        saver.save_start(model)
    val_stream = distribute.shard_by_data(data.eval_stream("val"))
    if best is not None and best.stop:  # a resumed run that had stopped early
        epoch = len(history)
        logging.info("Early stopping ended this run at epoch %d (%s); evaluating and "
                     "exporting.", epoch, best.describe())
    elif epoch < spec.train.epochs:
        logging.info(
            "Training epochs %d..%d of %d, %d steps each%s.",
            epoch + 1, spec.train.epochs, spec.train.epochs, job.steps_per_epoch,
            f", starting at step {step + 1} of epoch {epoch + 1}" if step else "",
        )
    else:
        logging.info("All %d epochs are done; evaluating and exporting.", spec.train.epochs)
    # In parts: the rest of an interrupted epoch on its own, then the epochs
    # on cached features, then those on images.
    while epoch < spec.train.epochs and not (best is not None and best.stop):
        cached = epoch < spec.cached_epochs
        end = epoch + 1 if step else spec.cached_epochs if cached else spec.train.epochs
        # The training stream is a pure function of the seed: skipping the
        # batches already consumed continues it exactly where a run stopped.
        skip = epoch * job.steps_per_epoch + step
        features_of = model if cached else None
        if spec.cached_epochs:  # fresh step functions for features or images: a
            # retraced function relaxed to both would lose the input's rank
            model.make_train_function(force=True)
            model.make_test_function(force=True)
        for callback in resumable:
            callback.resume_at(step)
        saver.resume_at(step, state.get("metric_sums") if state else None)
        try:
            train_input, class_weight = data.train_input(strategy, skip, features_of)
            model.fit(
                train_input,
                validation_data=(
                    distribute.shard_by_data(data.eval_stream("val", features_of=model))
                    if cached else val_stream
                ),
                epochs=end,
                initial_epoch=epoch,
                steps_per_epoch=job.steps_per_epoch - step,
                callbacks=fit_callbacks,
                class_weight=class_weight,
                shuffle=False,  # the stream is already shuffled, by seed and pass
                verbose=0,  # ProgressLog prints the lines that matter
            )
        except health.LossSpike as spike:  # back to the last checkpoint, gentler
            state = _roll_back(spike, manager, schedule, guard, recoveries, history)
            if best is not None:
                best.restore(state)
            schedule.lr_factors = _stage_factors(auto_factors, recoveries)
            epoch, step = state["epoch"], state["step"]
            continue
        epoch, step = end, 0
        if best is not None and best.stop:
            epoch = len(history)
            logging.info(
                "Early stopping at epoch %d of %d: no better %s for %d epoch(s) (%s).",
                epoch, spec.train.epochs, best.metric, best.since, best.describe(),
            )
    workdir_lib.write_history(history_path, history)

    # --------------------------------------------------------- evaluate, export
    if spec.cached_epochs:  # the test step may have been traced for features last
        model.make_test_function(force=True)
    steps = int(model.optimizer.iterations.numpy())  # before the best checkpoint's
    exported = _final_weights(spec, manager, model, job.reference, state)
    bn_gap = health.batchnorm_gap(job)
    results = model.evaluate(val_stream, verbose=0, return_dict=True)
    results.update(job.task.evaluate(model, data))  # e.g. detection's COCO mAP
    main = job.task.main_metric
    metrics = {
        f"val_{main}": float(results[main]),
        "val_loss": float(results["loss"]),
        "main_metric": f"val_{main}",
        "task": spec.task,
        # None when this invocation trained no step (the run was complete).
        "train_images_per_sec": throughput.images_per_sec if throughput.steps else None,
        "epochs": epoch,  # train.epochs, unless early stopping ended the run sooner
        "steps": steps,
        "train_images": data.train_size,
        "val_images": data.val_size,
        "num_classes": len(data.class_names),
        "replicas": strategy.num_replicas_in_sync,
        "resumed_from": state["path"] if state else None,
        "weights_sha256": checkpoint.fingerprint(model),
        # Training-mode minus inference-mode accuracy on training images, when
        # BatchNorm layers train on batch statistics (docs/batchnorm.md).
        "bn_train_eval_gap": bn_gap,
        # Loss-spike rollbacks, and how close accepted steps came to one.
        "recoveries": recoveries.events,
        "loss_spike_max_ratio": guard.max_ratio,
        # Which weights the figures above (and the export) are of.
        "weights": exported,
        "best": best.state()["best"] if best is not None else None,
        "early_stopped": bool(best is not None and best.stop),
    }
    # The task's other metrics (e.g. segmentation's pixel accuracy).
    metrics.update({f"val_{k}": float(v) for k, v in results.items() if k not in (main, "loss")})
    if schedule.info is not None:
        metrics["trainable_params"] = schedule.info.trainable_params
        metrics["trainable_fraction"] = schedule.info.fraction
    chance = data.chance_level() if spec.train.fail_at_chance else None
    metrics["chance_level"] = chance
    try:
        health.check_chance_level(metrics, chance, data.val_size, history)
    except health.ChanceLevel:
        workdir_lib.write_json(os.path.join(out, workdir_lib.METRICS_FILE), metrics)
        raise
    path = None
    if spec.export:
        logging.info("Exporting the SavedModel (%s weights)...", exported["which"])
        path = job.task.export(
            model, os.path.join(out, workdir_lib.EXPORT), data.class_names, spec
        )
        logging.info("Exported SavedModel to %s.", path)
    job.task.after_training(model, data, out)
    workdir_lib.write_json(os.path.join(out, workdir_lib.METRICS_FILE), metrics)
    logging.info("Final metrics: %s", json.dumps(metrics))
    return Result(metrics, model, list(history), workdir, path, spec)


def _final_weights(spec, manager, model, reference, state) -> dict:
    """Puts the weights to evaluate and export in `model`: the best
    checkpoint's (`export.which="best"`) or the last, then their moving
    average if there is one. Returns what they are, for metrics.json."""
    which, path = "last", None
    if spec.export_which == "best":
        best = checkpoint.CheckpointManager(
            manager.best_directory, **checkpoint.model_objects(model, reference)
        ).restore_latest()
        if best is None:
            logging.warning("export.which=best: no best checkpoint was kept (no finite %s); "
                            "evaluating and exporting the last weights.", spec.checkpoint.keep_best)
        else:
            which, path = "best", best["path"]
            logging.info("export.which=best: the weights of %s (epoch %d).", path, best["epoch"])
    if model.ema is not None:
        model.ema.exchange()  # for good: training is over
    return {"which": which, "checkpoint": path,
            "ema_decay": model.ema.decay if model.ema is not None else None}


def _restore(manager, job: job_lib.Job, has_checkpoints: bool) -> dict | None:
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
    if state["class_names"] != job.data.class_names:
        raise ValueError(
            f"Cannot resume from {state['path']}: it was trained on classes "
            f"{state['class_names']}, the data now has {job.data.class_names}."
        )
    if state["steps_per_epoch"] != job.steps_per_epoch:
        raise ValueError(
            f"Cannot resume from {state['path']}: it has {state['steps_per_epoch']} "
            f"steps per epoch, the data now gives {job.steps_per_epoch} (files were "
            "added or removed). Restore the data, or use --config.resume=False."
        )
    logging.info(
        "Resumed from %s: %d epoch(s) and %d step(s) done (global step %d), stage %s.",
        state["path"], state["epoch"], state["step"], state["global_step"], state["stage"],
    )
    return state


def _roll_back(spike, manager, schedule, guard, recoveries, history: list) -> dict:
    """After a loss spike: records it (or gives up, `health.TooManySpikes`),
    restores the last checkpoint and lowers the spiking stage's rate for the
    rest of the run. Returns the restored checkpoint's state."""
    stage = schedule.current or 0
    recoveries.record(spike, stage, schedule.describe())
    state = manager.restore_latest()
    if state is None:
        raise health.TooManySpikes(f"{spike} There is no checkpoint to roll back to.")
    history[:] = state["history"]
    guard.restore(state)
    schedule.restore(state)
    schedule.current = None  # re-entered at the next step, at its new rate
    logging.warning(
        "%s Rolled back to %s (epoch %d, step %d); stage %d now trains at x%.3g its "
        "rate (rollback %d of at most %d).", spike, state["path"], state["epoch"] + 1,
        state["step"], stage + 1, recoveries.lr_factors()[stage], len(recoveries.events),
        recoveries.limit,
    )
    return state


def _set_automatic_rate(job: job_lib.Job, lr_dir: str, fresh: bool) -> dict[int, float]:
    """`optimizer.learning_rate="auto"`: a fresh run takes the range tests'
    suggestions, one per stage that trains new variables (`keras_ft.lr_stages`);
    a resumed run the ones it started with. Returns the stages' rate factors."""
    if fresh:
        rates = lr_stages.find(job, lr_dir, job.spec.model.backbone)
    else:
        rates = lr_stages.load(lr_dir)
    job.model.optimizer.learning_rate = job.spec.learning_rate(job.total_steps, peak=rates.base)
    job.model.make_train_function(force=True)  # the step was traced with the old rate
    logging.info(
        "optimizer.learning_rate=auto: %.4g, stage rate factors %s, %s %s.", rates.base,
        ", ".join(f"{i + 1}: x{v:.3g}" for i, v in sorted(rates.factors.items())) or "none",
        "found by the range tests in" if fresh else "resumed from", lr_dir,
    )
    return rates.factors


def _stage_factors(auto: dict[int, float], recoveries: health.Recoveries) -> dict[int, float]:
    """Each stage's rate factor: the range tests' times the rollbacks'."""
    rollbacks = recoveries.lr_factors()
    return {i: auto.get(i, 1.0) * rollbacks.get(i, 1.0) for i in set(auto) | set(rollbacks)}
