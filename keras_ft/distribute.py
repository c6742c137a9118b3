"""The `tf.distribute` strategy a run uses, created once by the trainer."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("auto", "default", "one_device", "mirrored")


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


def create(name: str) -> tf.distribute.Strategy:
    """Creates the strategy `name` (one of `STRATEGIES`).

    auto: Mirrored over all GPUs when there are several, one device on a
    single GPU, else the default strategy. mirrored: all GPUs, or all logical
    CPU devices when there is no GPU.
    """
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device" if gpus else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy((gpus or cpus)[0].name)
    if name == "mirrored":
        return tf.distribute.MirroredStrategy([d.name for d in (gpus or cpus)])
    raise ValueError(
        f"Unknown distribute.strategy {name!r}. Choose one of: {', '.join(STRATEGIES)}."
    )


def check_batch_size(global_batch_size: int, strategy: tf.distribute.Strategy) -> int:
    """Returns the per-replica batch size; the global one must divide evenly."""
    replicas = strategy.num_replicas_in_sync
    if global_batch_size < 1 or global_batch_size % replicas:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a positive "
            f"multiple of the {replicas} replica(s) in sync."
        )
    return global_batch_size // replicas
