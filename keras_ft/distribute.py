"""The `tf.distribute` strategy a run uses, created once by the trainer.

Strategies (`distribute.strategy`):

- `default`: TensorFlow's default strategy (one device, no replication).
- `one_device`: the first GPU, else the CPU.
- `mirrored`: synchronous data parallelism over all local GPUs (or over
  the logical CPU devices of `distribute.cpu_devices`).
- `multi_worker`: `MultiWorkerMirroredStrategy` over the hosts listed in
  `TF_CONFIG` (`python -m launch.multiworker` sets it for local workers).
- `tpu`: `TPUStrategy` on the TPU named by `TPU_NAME` (default "local", a
  TPU VM's own chips).
- `auto`: `tpu` if a TPU is attached, else `multi_worker` if `TF_CONFIG`
  names more than one worker, else `mirrored` over several GPUs,
  `one_device` on one GPU, else `default`.

Under `multi_worker` every worker runs the same program. The chief (task
`chief`, or `worker` 0 when there is no chief) writes the workdir; the other
workers write the same files into a temporary folder that is removed when
they finish (`output_dir`), because saving a checkpoint may need every
worker's part of a collective. All workers restore from the chief's
checkpoints, so the workdir must be on storage that every worker can read
(one host, NFS, a shared volume). Checkpoints are renamed into place
atomically, so it must be a POSIX filesystem, not an object store.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(num_devices: int) -> None:
    """Splits the CPU into `num_devices` logical devices (before TF starts).

    This is how multi-replica training is tested without GPUs, as Keras' own
    multi-device tests do.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError as e:
        raise ValueError(
            "distribute.cpu_devices must be set before TensorFlow starts running "
            f"ops in this process ({e})."
        ) from e


def tpu_attached() -> bool:
    """Whether this host reaches a TPU: a TPU VM's accelerator devices, or a
    TPU named in the environment (as Cloud TPU and GKE set it)."""
    return bool(
        os.environ.get("TPU_NAME")
        or os.environ.get("KUBE_GOOGLE_CLOUD_TPU_ENDPOINTS")
        or os.path.exists("/dev/accel0")
        or os.path.exists("/dev/vfio/0")
    )


def cluster_size() -> int:
    """How many workers (chief included) `TF_CONFIG` names; 0 if it is unset
    or unreadable (`distribute.strategy=multi_worker` says what is wrong)."""
    try:
        jobs = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
        return sum(len(jobs.get(job, [])) for job in ("chief", "worker"))
    except (ValueError, AttributeError, TypeError):
        return 0


def _multi_worker() -> tf.distribute.Strategy:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        raise ValueError(
            "distribute.strategy=multi_worker needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": '
            '{"type": "worker", "index": 0}}); `python -m launch.multiworker '
            "--num_workers=N -- <train command>` sets it for local workers."
        )
    try:
        spec = json.loads(raw)
        task = spec["task"]
        hosts = spec["cluster"][task["type"]]
        if not 0 <= int(task["index"]) < len(hosts):
            raise IndexError(f"task index {task['index']} of {len(hosts)} {task['type']}(s)")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(
            f"TF_CONFIG is not a valid cluster spec ({type(e).__name__}: {e}); it needs "
            '"cluster" (job name -> list of host:port) and "task" ({"type", "index"}) '
            f"naming one of them. Got: {raw[:200]}"
        ) from None
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
    )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )
    except RuntimeError as e:  # "Collective ops must be configured at program startup"
        raise ValueError(
            f"distribute.strategy=multi_worker: {e}. Create the strategy before "
            "TensorFlow runs any op (keras_ft.trainer does; in your own code, "
            "call keras_ft.distribute.create first)."
        ) from e


def _tpu() -> tf.distribute.Strategy:
    name = os.environ.get("TPU_NAME", "local")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"distribute.strategy=tpu: no TPU reachable as TPU_NAME={name!r} ({first}). "
            "Run on a Cloud TPU VM (TPU_NAME=local) or set TPU_NAME to the TPU's name "
            "or grpc:// address; use distribute.strategy=auto elsewhere."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def create(name: str) -> tf.distribute.Strategy:
    """Creates the strategy `name` (one of `STRATEGIES`; see the module doc).

    `multi_worker` must be created before TensorFlow runs any op in the
    process (it configures the collective ops of the runtime).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"Unknown distribute.strategy {name!r}. Choose one of: {', '.join(STRATEGIES)}."
        )
    if name == "multi_worker" or (name == "auto" and cluster_size() > 1):
        return _multi_worker()
    if cluster_size() > 1:  # N copies of a one-worker run would share one workdir
        raise ValueError(
            f"TF_CONFIG names {cluster_size()} workers, but distribute.strategy={name!r} "
            "trains each alone: use distribute.strategy=multi_worker (or auto)."
        )
    if name == "tpu" or (name == "auto" and tpu_attached()):
        return _tpu()
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device" if gpus else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy((gpus or cpus)[0].name)
    return tf.distribute.MirroredStrategy([d.name for d in (gpus or cpus)])


def start(config) -> tf.distribute.Strategy:
    """The strategy of a run's `distribute` config: splits the CPU if asked,
    then creates the strategy. Call it before any other TensorFlow work."""
    if config.cpu_devices:
        split_cpu(config.cpu_devices)
    return create(config.strategy)


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes run `strategy` together (1 unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1
    jobs = resolver.cluster_spec().as_dict()
    return sum(len(jobs.get(job, [])) for job in ("chief", "worker"))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's outputs (always, with one worker)."""
    return bool(strategy.extended.should_checkpoint)


def describe(strategy: tf.distribute.Strategy) -> str:
    """E.g. "MultiWorkerMirroredStrategy with 2 replica(s) on 2 worker(s); this
    is worker 1, not the chief"."""
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # the class is CollectiveAllReduceStrategy
    text = f"{name} with {strategy.num_replicas_in_sync} replica(s)"
    workers = num_workers(strategy)
    if workers > 1:
        resolver = strategy.cluster_resolver
        role = "the chief" if is_chief(strategy) else "not the chief"
        text += (
            f" on {workers} worker(s); this is {resolver.task_type} "
            f"{resolver.task_id}, {role}"
        )
    return text


@contextlib.contextmanager
def output_dir(strategy: tf.distribute.Strategy, workdir: str):
    """Yields where this process writes the run's outputs: `workdir` on the
    chief, else a temporary folder, removed on the way out (also on errors).

    Every worker writes (a save may need all of them to take part); only the
    chief's files are kept.
    """
    if is_chief(strategy):
        yield workdir
        return
    resolver = strategy.cluster_resolver
    tmp = tempfile.mkdtemp(prefix=f"keras_ft-{resolver.task_type}{resolver.task_id}-")
    logging.info("Not the chief: writing to %s (removed at the end); the run is in %s.",
                 tmp, workdir)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset`, marked for sharding by element across workers.

    Under `multi_worker` each global batch is split between the workers
    (each takes its replicas' share of every batch), so a step sees the
    same images as on one device. Sharding by file does not apply: the
    streams are built from lists of images, not from record files.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(options)


def any_worker(strategy: tf.distribute.Strategy, flags: list) -> list:
    """`flags` OR-ed over all workers: one small all-reduce, so every worker
    must call it at the same point. With one worker, `flags` as they are."""
    if num_workers(strategy) == 1:
        return [bool(f) for f in flags]
    total = _any_fn(strategy)(tf.constant([1.0 if f else 0.0 for f in flags]))
    return [bool(v > 0) for v in total.numpy()]


_ANY_FNS: dict = {}


def _any_fn(strategy):
    if id(strategy) not in _ANY_FNS:

        @tf.function
        def any_(values):
            per_replica = strategy.run(tf.identity, args=(values,))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        _ANY_FNS[id(strategy)] = any_
    return _ANY_FNS[id(strategy)]


def check_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Returns the per-replica batch size; the global one must divide evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size < 1 or global_batch_size % replicas:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a positive "
            f"multiple of the {replicas} replica(s) in sync."
        )
    return global_batch_size // replicas
