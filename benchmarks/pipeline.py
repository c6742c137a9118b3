"""Is the input pipeline the bottleneck? And what does feature caching buy?

    python benchmarks/pipeline.py [--backbones=mobilenet_v2,resnet50] \
        [--image_size=128] [--batch_size=32] [--images=1024] [--rounds=3]

Writes `--images` JPEG photos-like files (320x240, smooth colour fields
plus noise, so decoding costs what a photo's does) into a temporary image
folder, then, for each backbone, round by round (interleaved, so machine
noise hits all alike):

1. pipeline: images/s of `data.make_dataset(training=True)` alone — read,
   decode, resize, flip, batch — with the default augmentation; the same
   with the images decoded and sized once in memory (`data.cache_images_mb`,
   `data.size_all`); and with random resized crop + RandAugment (2 ops);
2. training: images/s of a train step on an in-memory batch, head only and
   all blocks (the model's cost without the pipeline);
3. one head-only epoch with `fit()` on the image stream vs on the cached
   feature stream (`keras_ft.features`), and the one-off cost of the cache.

Reports medians and ratios (pipeline / training should be >= 3: the model,
not the input, sets the pace); writes benchmarks/results/pipeline.json.
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_ft  # noqa: E402
from keras_ft import augment, data, features, freezing, sources  # noqa: E402
from keras_ft.stages import Stage  # noqa: E402

import _results  # noqa: E402  (benchmarks/_results.py)


def write_photos(root, n, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(n):
        label = f"class_{i % 4}"
        os.makedirs(os.path.join(root, label), exist_ok=True)
        a, b, c = rng.uniform(0, 1, 3)
        image = np.stack([
            128 + 100 * np.sin(xx / (20 + 40 * a) + yy / 50),
            128 + 100 * np.cos(yy / (20 + 40 * b)),
            255 * c * np.ones_like(xx),
        ], -1) + rng.normal(0, 12, (240, 320, 3))
        blob = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=90)
        with open(os.path.join(root, label, f"{i:05d}.jpg"), "wb") as f:
            f.write(blob.numpy())
    return root


def pipeline_rate(images, size, batch, aug, batches, sized=None):
    ds = data.make_dataset(images, size, batch, training=True, seed=0, augment=aug, sized=sized)
    it = iter(ds)
    next(it)  # start-up (threads, first decode)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=_results.default_path("pipeline"))
    args = parser.parse_args()
    size, batch = args.image_size, args.batch_size

    root = write_photos(tempfile.mkdtemp(prefix="keras_ft_photos_"), args.images)
    images = sources.from_folder(root)
    steps = len(images) // batch
    heavy = augment.Augment(random_resized_crop=(0.08, 1.0), randaugment_ops=2)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, 4, batch)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {"image_size": size, "batch_size": batch, "images": len(images),
               "rounds": args.rounds, "backbones": {}}

    for name in args.backbones.split(","):
        keras.utils.set_random_seed(0)
        model = keras_ft.build_classifier(name, 4, image_size=size, class_names=images.class_names)
        model.compile(keras_ft.SGD(1e-4, momentum=0.9), loss=loss, metrics=["accuracy"])
        # Real-looking activations for the cached features' sake.
        freezing.reestimate_batchnorm(model, data.make_dataset(images, size, batch, training=False), 4)

        def train_rate(blocks):
            freezing.apply_stage(model, Stage(epochs=1, blocks=blocks))
            model.make_train_function(force=True)
            model.train_on_batch(x, y)
            start = time.perf_counter()
            for _ in range(3):
                model.train_on_batch(x, y)
            return 3 * batch / (time.perf_counter() - start)

        def epoch_seconds(train_ds):
            freezing.apply_stage(model, Stage(epochs=1, blocks=0))
            model.make_train_function(force=True)
            model.fit(train_ds.take(1), epochs=1, steps_per_epoch=1, verbose=0)  # trace
            start = time.perf_counter()
            model.fit(train_ds, epochs=1, steps_per_epoch=steps, verbose=0)
            return time.perf_counter() - start

        rates = {k: [] for k in ("pipeline", "pipeline_in_memory", "pipeline_heavy",
                                 "head_only", "all_blocks")}
        epochs = {"images": [], "cached": []}
        cache_seconds = []
        for r in range(args.rounds):
            rates["pipeline"].append(pipeline_rate(images, size, batch, None, steps))
            sized = data.size_all(images, size)
            rates["pipeline_in_memory"].append(
                pipeline_rate(images, size, batch, None, steps, sized))
            rates["pipeline_heavy"].append(pipeline_rate(images, size, batch, heavy, steps))
            rates["head_only"].append(train_rate(0))
            rates["all_blocks"].append(train_rate(-1))
            epochs["images"].append(epoch_seconds(
                data.make_dataset(images, size, batch, training=True, seed=r)))
            cache = features.compute(model, images, images.subset(np.arange(batch)), size, batch)
            cache_seconds.append(cache.seconds)
            epochs["cached"].append(epoch_seconds(features.training_stream(cache, batch, seed=r)))
            print(f"{name} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v[-1]:.0f} img/s" for k, v in rates.items())
                + f"; head-only epoch {epochs['images'][-1]:.2f}s on images, "
                f"{epochs['cached'][-1]:.3f}s cached (cache built in {cache_seconds[-1]:.2f}s)",
                flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        ep = {k: statistics.median(v) for k, v in epochs.items()}
        results["backbones"][name] = {
            "images_per_sec": med,
            "pipeline_over_head_only": med["pipeline"] / med["head_only"],
            "pipeline_over_all_blocks": med["pipeline"] / med["all_blocks"],
            "heavy_pipeline_over_all_blocks": med["pipeline_heavy"] / med["all_blocks"],
            "head_only_epoch_seconds": ep,
            "cached_epoch_speedup": ep["images"] / ep["cached"],
            "cache_seconds": statistics.median(cache_seconds),
        }

    print(f"\n{size}px batch {batch}, {len(images)} JPEGs of 320x240, 2 CPU cores "
          f"(median of {args.rounds} interleaved rounds)")
    print(f"{'backbone':<14}{'pipeline':>10}{'in memory':>11}{'heavy aug':>11}{'head-only':>11}"
          f"{'all blocks':>12}"
          f"{'pipe/head':>11}{'pipe/all':>10}{'heavy/all':>11}{'epoch img':>11}{'cached':>9}{'speedup':>9}")
    for name, r in results["backbones"].items():
        m, e = r["images_per_sec"], r["head_only_epoch_seconds"]
        print(f"{name:<14}{m['pipeline']:>10.0f}{m['pipeline_in_memory']:>11.0f}"
              f"{m['pipeline_heavy']:>11.0f}{m['head_only']:>11.0f}"
              f"{m['all_blocks']:>12.0f}{r['pipeline_over_head_only']:>10.1f}x"
              f"{r['pipeline_over_all_blocks']:>9.1f}x{r['heavy_pipeline_over_all_blocks']:>10.1f}x"
              f"{e['images']:>10.2f}s{e['cached']:>8.3f}s{r['cached_epoch_speedup']:>8.1f}x")
    _results.write(results, args.out)


if __name__ == "__main__":
    main()
