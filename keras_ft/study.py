"""Studies: the fine-tuning questions answered by measurement on a config's
own data and backbone (`python -m launch.study`).

Each study is a set of arms; each arm is a normal keras_ft run (its own
workdir, `keras_ft.trainer.run`) of the config with a few keys changed, once
per seed, all with the config's budget (`train.epochs`):

    depth    head only; the top 1, 2 and 4 blocks; all blocks; gradual
             unfreezing (ULMFiT); LP-FT. Blocks train at
             `finetune_lr_scale` x the rate. Reference: all.
    lr       a grid of multiples of the range test's suggestion, for the
             head-only and the all-blocks stage. Reference: the suggestion.
    scratch  the config's recipe vs the same architecture from random
             init, trained fairly: every layer and BatchNorm trainable from
             step 0, its own range-tested rate, at 1x, 3x and 10x the steps.
             Reference: pretrained.
    size     pretrained vs scratch (1x steps) at several training-set sizes
             (`data.train_per_class`), the same steps at each size.
             Reference: pretrained at the same size.
    peft     after a head-only probe, all blocks with full, BitFit,
             BatchNorm-only and LoRA (two ranks), each at its own
             range-tested rate. Reference: full.

WORKDIR/STUDY/ARM/seed_S is the arm's run, WORKDIR/STUDY/ARM/seed_S.json its
record (written when the run ends, ok or failed); a rerun skips recorded
arms, and an interrupted arm resumes from its checkpoints. Range tests are
kept in WORKDIR/STUDY/range_test_*. WORKDIR/study.json, study.md and the PNG
plots are rewritten after every arm.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import time
from typing import Mapping, Sequence

from absl import logging

from keras_ft import stages, study_stats, workdir as workdir_lib

STUDIES = ("depth", "lr", "scratch", "size", "peft")
JSON_FILE, MARKDOWN_FILE, CONFIG_FILE = "study.json", "study.md", "study_config.json"


@dataclasses.dataclass(frozen=True)
class Options:
    seeds: int = 3
    finetune_lr_scale: float = 0.1
    lr_grid: tuple = (1 / 30, 0.1, 1 / 3, 1.0, 3.0, 10.0)
    scratch_steps: tuple = (1, 3, 10)
    sizes: tuple = (10, 50, 200, 1000)
    lora_ranks: tuple = (4, 16)

    def check(self) -> None:
        if self.seeds < 2:
            raise ValueError(f"--seeds={self.seeds}: a 95% interval needs at least 2 seeds.")
        if not (min(self.lr_grid) < 1.0 < max(self.lr_grid)):
            raise ValueError(f"--lr_grid={','.join(f'{g:g}' for g in self.lr_grid)} does not bracket "
                             "the suggestion: give multipliers below and above 1.")
        for name in ("scratch_steps", "sizes", "lora_ranks"):
            values = getattr(self, name)
            if not values or any(int(v) != v or v < 1 for v in values):
                raise ValueError(f"--{name}={values}: give positive integers.")
        if not 0 < self.finetune_lr_scale:
            raise ValueError(f"--finetune_lr_scale={self.finetune_lr_scale} must be positive.")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: config keys to change, its series and x in the plots, and
    the arm its paired differences are taken against."""

    name: str
    overrides: Mapping
    describe: str
    group: str = ""
    x: float | None = None
    reference: str = ""


def parse_studies(text: str) -> list[str]:
    names = list(STUDIES) if text == "all" else [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STUDIES]
    if unknown or not names:
        raise ValueError(f"Unknown study {', '.join(unknown) or text!r}: choose from "
                         f"{', '.join(STUDIES)}, a comma-separated list, or all.")
    return names


def _first_head_only(stage_list) -> bool:
    return dict(stage_list[0]).get("blocks", 0) == 0


def _with_cache(config, overrides: dict) -> dict:
    """Caches features for an arm whose first stage is head only, when the
    task and the config's augmentation allow it (flips only)."""
    from keras_ft import tasks

    if not tasks.get(config.task).caches_features:
        return dict(overrides)
    a = config.data.augment
    plain = not (a.random_resized_crop or a.randaugment_ops or a.mixup or a.cutmix)
    method = overrides.get("freeze.method", config.freeze.method)
    head_first = _first_head_only(overrides.get("freeze.stages", config.freeze.stages))
    return dict(overrides, **{"data.cache_features": plain and head_first and method != "lora"})


def _scratch(epochs: int, rate: float) -> dict:
    return {"model.weights": "none", "freeze.batchnorm": "trainable", "freeze.method": "full",
            "freeze.lr_decay": 1.0, "freeze.stages": stages.all_blocks(epochs, 1.0),
            "train.epochs": epochs, "optimizer.learning_rate": rate, "optimizer.l2sp": 0.0,
            "data.cache_features": False}


def plan(study: str, config, options: Options, rates=None, steps_per_epoch: int = 0) -> list[Arm]:
    """The arms of `study`. `rates(name, overrides)` runs (or reads) a range
    test and returns its suggestion; `steps_per_epoch` is the config's."""
    e, s = int(config.train.epochs), options.finetune_lr_scale
    if study in ("depth", "peft") and e < 2:
        raise ValueError(f"train.epochs={e}: the {study} study's staged arms need at least 2.")
    probe = max(1, e // 3)
    full = {"freeze.method": "full"}
    if study == "depth":
        arms = [Arm("head", {"freeze.stages": stages.head(e)}, "head only", reference="all")]
        arms += [Arm(f"last_{k}", {"freeze.stages": stages.last_k_blocks(k, e, s)},
                     f"top {k} block(s) from the start, lr x {s:g}", reference="all") for k in (1, 2, 4)]
        arms += [
            Arm("all", {"freeze.stages": stages.all_blocks(e, s)}, f"all blocks, lr x {s:g}",
                reference="all"),
            Arm("gradual", {"freeze.stages": stages.gradual(1, min(4, e - 1)),
                            "freeze.lr_decay": stages.ULMFIT_LR_DECAY},
                "ULMFiT: one more block each epoch, lr / 2.6 per block down", reference="all"),
            Arm("lp_ft", {"freeze.stages": stages.lp_ft(probe, s, e - probe)},
                f"head {probe} epoch(s), then all blocks at lr x {s:g}", reference="all"),
        ]
        return [dataclasses.replace(a, overrides=_with_cache(config, dict(a.overrides, **full)))
                for a in arms]
    if study == "peft":
        # Each method fine-tunes at its own rate, the range test's suggestion
        # for its all-blocks stage: methods that train 1% of the weights and
        # LoRA's low-rank products want other rates than full fine-tuning.
        base_rate = _numeric_rate(config)
        text = config.task == "text_classification"  # a BERT has no BatchNorm: no bn_only arm
        methods = [("full", {}, "all weights")]
        methods.append(("bitfit", {}, "biases and LayerNorm beta" if text else
                        "biases and BatchNorm beta"))
        methods += [] if text else [("bn_only", {}, "BatchNorm gamma/beta")]
        methods += [(f"lora_r{rank}", {"freeze.lora_rank": int(rank)}, f"LoRA rank {rank} on "
                     + ("attention query/value" if text else "1x1 convolutions and Dense"))
                    for rank in options.lora_ranks]
        arms = []
        for name, extra, what in methods:
            method = {"freeze.method": name.split("_r")[0], **extra}
            rate = rates(f"peft_{name}", dict(method, **{
                "freeze.stages": stages.all_blocks(e, 1.0), "freeze.lr_decay": 1.0}))
            scale = rate / base_rate
            arms.append(Arm(name, dict(method, **{"freeze.stages": stages.lp_ft(probe, scale, e - probe)}),
                            f"{what}, at its range-tested rate {rate:.3g} (lr x {scale:.3g})",
                            reference="full"))
        return [dataclasses.replace(a, overrides=_with_cache(config, a.overrides)) for a in arms]
    if study == "lr":
        arms = []
        for group, stage in (("head", stages.head(e)), ("all", stages.all_blocks(e, 1.0))):
            base = dict(full, **{"freeze.stages": stage, "freeze.lr_decay": 1.0})
            suggestion = rates(f"lr_{group}", base)
            for m in sorted(set(options.lr_grid) | {1.0}):
                rate = suggestion * m
                arms.append(Arm(f"{group}_x{m:.3g}", _with_cache(config, dict(
                    base, **{"optimizer.learning_rate": rate})), f"{group}: {m:.3g} x suggestion",
                    group=group, x=rate, reference=f"{group}_x1"))
        return arms
    scratch_rate = rates("scratch", _scratch(e, 1.0))
    pretrained = {}  # the config's own recipe
    if study == "scratch":
        arms = [Arm("pretrained", pretrained, "the config's recipe", group="pretrained",
                    x=e * steps_per_epoch, reference="pretrained")]
        arms += [Arm(f"scratch_x{m}", _scratch(e * int(m), scratch_rate),
                     f"random init, all trainable, {m}x the steps", group="scratch",
                     x=e * int(m) * steps_per_epoch, reference="pretrained")
                 for m in options.scratch_steps]
        return arms
    if study == "size":
        arms = []
        for n in options.sizes:
            fixed = {"data.train_per_class": int(n), "train.steps_per_epoch": steps_per_epoch}
            arms.append(Arm(f"pretrained_{n}", dict(pretrained, **fixed), f"{n}/class, the config's recipe",
                            group="pretrained", x=n, reference=f"pretrained_{n}"))
            arms.append(Arm(f"scratch_{n}", dict(_scratch(e, scratch_rate), **fixed),
                            f"{n}/class, random init", group="scratch", x=n,
                            reference=f"pretrained_{n}"))
        return arms
    raise ValueError(f"Unknown study {study!r}: choose from {', '.join(STUDIES)}.")


def _numeric_rate(config) -> float:
    rate = config.optimizer.learning_rate
    if isinstance(rate, str):
        raise ValueError("The peft study scales each method's stage to its range-tested rate "
                         "from optimizer.learning_rate: give a number, not 'auto'.")
    return float(rate)


def _arm_config(config, overrides: Mapping, seed: int):
    from keras_ft import api

    c = copy.deepcopy(config)
    c.unlock()
    api.apply_overrides(c, dict(overrides, **{
        "seed": seed, "export.enabled": False, "train.fail_at_chance": False,
        "train.progress": "log", "resume": True}))
    c.lock()
    return c


def _peak_rss_reset() -> bool:
    try:  # Linux: "5" resets the process's peak resident set size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _NoRetracingWarnings:
    """Drops TensorFlow's "triggered tf.function retracing" warning: the arms
    of a study build a new model each, in one process, so Keras's train and
    predict functions are traced again on purpose."""

    def filter(self, record) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


_RETRACING_FILTER = _NoRetracingWarnings()  # one instance: addFilter skips a repeat


def run_arm(config, arm: Arm, seed: int, directory: str) -> dict:
    """Runs one arm for one seed in `directory` (or resumes it); returns its
    record. A run that fails (NaN, bad data, a loss that keeps spiking) is
    recorded as failed with its cause, not raised."""
    import keras

    from keras_ft import checkpoint, trainer

    workdir = os.path.join(directory, f"seed_{seed}")
    resumed = workdir_lib.has_checkpoints(workdir)
    measured = _peak_rss_reset()
    start = time.perf_counter()
    record = {"arm": arm.name, "seed": seed, "workdir": workdir, "resumed": resumed,
              "overrides": json.loads(json.dumps(dict(arm.overrides)))}
    previous = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # the arm's own lines stay in its workdir's files
    try:
        metrics = trainer.run(_arm_config(config, arm.overrides, seed), workdir).metrics
    except (KeyboardInterrupt, checkpoint.Preempted):
        raise
    except Exception as e:  # noqa: BLE001: a failed arm is a result; the study goes on
        record.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    else:
        main = metrics["main_metric"]
        record.update(status="ok", main_metric=main, **{main: metrics[main]},
                      val_loss=metrics["val_loss"], trainable_params=metrics.get("trainable_params"),
                      images_per_sec=metrics["train_images_per_sec"], steps=metrics["steps"],
                      train_images=metrics["train_images"])
    finally:
        logging.set_verbosity(previous)
        keras.backend.clear_session()
        gc.collect()
    record["train_seconds"] = time.perf_counter() - start
    record["peak_rss_mb"] = _peak_rss_mb() if measured else None
    os.makedirs(directory, exist_ok=True)  # a run that failed at once made none
    workdir_lib.write_json(os.path.join(directory, f"seed_{seed}.json"), record)
    return record


def _range_test(config, overrides: Mapping, directory: str, seed: int) -> float:
    """The range test's suggestion for `config` with `overrides`, run once
    and kept in `directory`."""
    import keras

    from keras_ft import job as job_lib, lr_finder, lr_stages, spec as spec_lib

    path = os.path.join(directory, lr_finder.JSON_FILE)
    if os.path.exists(path):
        return lr_finder.load_suggestion(directory)
    logging.info("Range test for %s...", os.path.basename(directory))
    spec = spec_lib.resolve(_arm_config(config, dict(overrides, **{"data.cache_features": False}), seed))
    previous = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)
    try:
        job = job_lib.assemble(spec)
        job_lib.reestimate_if_configured(job)
        rate = lr_stages.find(job, directory, spec.model.backbone).base
    finally:
        logging.set_verbosity(previous)
        keras.backend.clear_session()
        gc.collect()
    logging.info("Range test for %s: suggestion %.3g.", os.path.basename(directory), rate)
    return rate


def _check_workdir(config, workdir: str) -> None:
    """A study's folder holds one base config: another is refused."""
    from keras_ft import spec as spec_lib

    resolved = json.loads(json.dumps(spec_lib.resolve(config).resolved, default=str))
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != resolved:
            before, now = workdir_lib.flatten(saved), workdir_lib.flatten(resolved)
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ValueError(f"{workdir} holds a study of another config (changed: "
                             f"{', '.join(changed[:5])}): use a new --workdir.")
    else:
        workdir_lib.write_json(path, resolved)


def _steps_per_epoch(config, options: Options, studies: Sequence[str]) -> int:
    """The config's steps per epoch, checking the size arms against the data."""
    from keras_ft import spec as spec_lib
    from keras_ft.tasks import image_classification

    spec = spec_lib.resolve(config)
    _, train, _, _ = image_classification.load_splits(spec.data, spec.seed)
    if "size" in studies:
        import numpy as np

        fewest = int(np.bincount(train.labels, minlength=len(train.class_names)).min())
        too_big = [n for n in options.sizes if n > fewest]
        if too_big:
            raise ValueError(f"--sizes={','.join(map(str, options.sizes))}: {too_big[0]} images per "
                             f"class asked, but the smallest class has {fewest} training images.")
    return spec.train.steps_per_epoch or len(train) // spec.train.global_batch_size


def run(config, workdir: str, studies: Sequence[str], options: Options = Options()) -> dict:
    """Runs (or resumes) `studies` of `config` in `workdir`; returns study.json's content."""
    options.check()
    import tensorflow as tf

    tf.get_logger().addFilter(_RETRACING_FILTER)
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.check_writable(workdir)
    _check_workdir(config, workdir)
    # Only the scratch and size arms need the steps per epoch (a scan of the data).
    needs_steps = {"scratch", "size"} & set(studies)
    steps_per_epoch = _steps_per_epoch(config, options, studies) if needs_steps else 0
    seeds = [int(config.seed) + k for k in range(options.seeds)]
    result = {"seeds": seeds, "options": dataclasses.asdict(options), "studies": {}}
    for study in studies:
        base = os.path.join(workdir, study)
        suggestions = {}

        def rates(name, overrides, base=base, suggestions=suggestions):
            suggestions[name] = _range_test(config, overrides, os.path.join(base, f"range_test_{name}"),
                                            seeds[0])
            return suggestions[name]

        arms = plan(study, config, options, rates, steps_per_epoch)
        records = {}
        total = len(arms) * len(seeds)
        for i, (arm, seed) in enumerate(((a, s) for a in arms for s in seeds), 1):
            directory = os.path.join(base, arm.name)
            path = os.path.join(directory, f"seed_{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    records[arm.name, seed] = json.load(f)
                note = "recorded earlier"
            else:
                records[arm.name, seed] = run_arm(config, arm, seed, directory)
                note = f"{records[arm.name, seed]['train_seconds']:.0f} s"
            r = records[arm.name, seed]
            outcome = (f"{r['main_metric']} {r[r['main_metric']]:.4f}" if r["status"] == "ok"
                       else f"FAILED ({r['error']}); the study goes on")
            logging.info("[%s %d/%d] %s seed %d: %s, %s.", study, i, total, arm.name, seed, outcome, note)
            result["studies"][study] = _summary(study, arms, records, suggestions, workdir)
            _write(result, workdir)
        _plot(study, result["studies"][study], workdir)
        _write(result, workdir)
        logging.info("%s: %s", study, result["studies"][study]["answer"])
    return result


def _summary(study, arms, records, suggestions, workdir) -> dict:
    metrics = [r["main_metric"] for r in records.values() if r["status"] == "ok"]
    metric = metrics[0] if metrics else "val_accuracy"
    rows = study_stats.summarize(arms, records, metric)
    out = {"metric": metric, "arms": rows, "suggestions": suggestions,
           "runs": [records[k] for k in sorted(records, key=str)]}
    if study == "size":
        out["crossover"] = study_stats.crossover(rows, metric)
        out["answer"] = out["crossover"]["text"] if out["crossover"] else "no finished arms yet."
    elif study == "lr":
        out["recommendation"] = {}
        for group in ("head", "all"):
            rec = study_stats.recommend([r for r in rows if r["group"] == group], metric)
            if rec:
                at = next((r for r in rows if r["arm"] == f"{group}_x1"), None)
                rec["text"] += (f" The suggestion ({suggestions.get('lr_' + group, 0):.3g}) scored "
                                f"{study_stats._pm(at[metric]) if at else 'n/a'}.")
                out["recommendation"][group] = rec
        out["answer"] = " ".join(f"{g}: {r['text']}" for g, r in out["recommendation"].items())
    else:
        out["recommendation"] = study_stats.recommend(rows, metric)
        out["answer"] = out["recommendation"]["text"] if out["recommendation"] else "no finished arms yet."
    return out


def _write(result: dict, workdir: str) -> None:
    workdir_lib.write_json(os.path.join(workdir, JSON_FILE), result)
    parts = ["# Study results", ""]
    for study, s in result["studies"].items():
        parts += [f"## {study}", "", study_stats.table(s["arms"], s["metric"]), "",
                  f"**Answer.** {s['answer']}", ""]
    workdir_lib.write_atomic(os.path.join(workdir, MARKDOWN_FILE), "\n".join(parts))


def _plot(study: str, summary: dict, workdir: str) -> None:
    marks = {k[3:]: v for k, v in summary["suggestions"].items() if k.startswith("lr_")} if study == "lr" else None
    try:
        path = study_stats.plot(study, summary["arms"], summary["metric"], workdir, marks)
        summary["plot"] = os.path.basename(path)
    except ImportError:
        logging.warning("matplotlib is not installed: no plot for the %s study.", study)
