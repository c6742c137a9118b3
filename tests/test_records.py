"""Data at scale: ArrayRecord packs read by index, the training order computed
at any step, each input pipeline reading only its share of every batch."""

import collections
import itertools
import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from keras_ft import augment, data, records, sources
from launch import pack
from runs import overridden, tiny_config


def replayed_order(n, batch_size, seed, skip_batches):
    """The training order as a replay: every pass generated, then skipped."""
    per_pass = (n // batch_size) * batch_size

    def one_pass(p):
        order = tf.random.experimental.index_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), p]),
            max_index=n - 1)
        return tf.data.Dataset.from_tensor_slices(order[:per_pass])

    ds = tf.data.Dataset.range(2**62).flat_map(one_pass).enumerate()
    return ds.skip(skip_batches * batch_size)


def pairs(ds, count):
    return [tuple(map(int, x)) for x in ds.take(count).as_numpy_iterator()]


@pytest.mark.parametrize("n, batch, skip", [(10, 4, 0), (10, 4, 1), (10, 4, 2), (10, 4, 5),
                                            (37, 8, 9), (37, 6, 6)])
def test_training_order_at_any_step_is_the_replayed_stream(n, batch, skip):
    # skip 2 of 2 batches a pass: the next pass's start; 5: inside the third.
    assert pairs(data.training_order(n, batch, 3, skip), 40) == pairs(
        replayed_order(n, batch, 3, skip), 40)


@pytest.mark.parametrize("workers", [2, 4])
def test_the_shares_of_the_pipelines_make_up_each_batch(workers):
    n, batch, skip = 37, 8, 3
    whole = pairs(data.training_order(n, batch, 5, skip), 6 * batch)
    width = batch // workers
    shares = [pairs(data.training_order(n, batch, 5, skip, (w, workers)), 6 * width)
              for w in range(workers)]
    merged = [p for step in range(6) for share in shares for p in share[step * width:(step + 1) * width]]
    assert merged == whole
    with pytest.raises(ValueError, match="divide evenly"):
        data.training_order(n, batch, 5, 0, (0, 3))
    with pytest.raises(ValueError, match="do not fill one batch"):
        data.training_order(3, 4, 5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Real PNG/JPEG files in train/ and val/ folders (the source's own split)."""
    root = tmp_path_factory.mktemp("split_folder")
    write_image_folder(root / "train", {"ant": 9, "bee": 7, "cat": 8}, seed=1)
    write_image_folder(root / "val", {"ant": 2, "bee": 3, "cat": 2}, seed=2)
    return str(root)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("packs") / "pets")
    result = pack.run(f"folder:{folder}", out, shards=3)
    assert (result.num_records, result.shards) == (31, 3)
    return out


def test_a_pack_holds_the_files_labels_and_split_of_its_folder(folder, packed):
    original = sources.load_source(f"folder:{folder}")
    loaded = sources.load_source(f"records:{packed}")
    assert loaded.kind == data.RECORDS
    assert loaded.class_names == original.class_names == ["ant", "bee", "cat"]
    np.testing.assert_array_equal(loaded.labels, original.labels)
    np.testing.assert_array_equal(loaded.val_mask, original.val_mask)
    for i in (0, 8, 15, 30):  # across the three shards
        with open(original.images[i], "rb") as f:
            assert loaded.images.read(i) == f.read()
    meta = json.load(open(os.path.join(packed, records.META)))
    assert [s["records"] for s in meta["shards"]] == [10, 11, 10]
    assert meta["source"] == f"folder:{folder}"
    # Split and subsets keep reading the right records.
    train, val = data.split_as_given(loaded)
    assert len(train) == 24 and val.images.read(0) == loaded.images.read(24)


def test_a_pack_gives_the_same_batches_as_its_folder(folder, packed):
    original, loaded = (sources.load_source(s) for s in (f"folder:{folder}", f"records:{packed}"))
    aug = augment.Augment(flip=True, randaugment_ops=2)
    for training in (True, False):
        kwargs = dict(training=training, seed=4, augment=aug if training else None)
        a = list(data.make_dataset(original, 24, 8, **kwargs).take(4))
        b = list(data.make_dataset(loaded, 24, 8, **kwargs).take(4))
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())


class CountingStore:
    """A store that counts the records read, for the decode-work checks."""

    def __init__(self, store):
        self._store, self.reads, self._lock = store, [], threading.Lock()

    def read(self, i):
        with self._lock:
            self.reads.append(i)
        return self._store.read(i)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _counted(packed):
    loaded = sources.load_source(f"records:{packed}")
    store = CountingStore(loaded.images.store)
    loaded.images = data.RecordImages(store, loaded.images.index)
    return loaded, store


@pytest.mark.parametrize("workers, replicas", [(1, 2), (2, 1), (2, 2)])
def test_each_pipeline_reads_only_its_share_and_the_shares_are_the_batch(packed, workers, replicas):
    # 31 images, batch 8: 3 batches a pass; 7 steps from step 2 cross two passes.
    steps, batch, skip = 7, 8, 2
    aug = augment.Augment(flip=True, randaugment_ops=1)
    whole, _ = _counted(packed)
    expected = list(data.make_dataset(whole, 16, batch, True, 9, skip, augment=aug).take(steps))
    replica_batches, reads = [], []
    for w in range(workers):
        loaded, store = _counted(packed)
        context = tf.distribute.InputContext(workers, w, workers * replicas)
        ds = data.make_dataset(loaded, 16, batch, True, 9, skip, augment=aug, input_context=context)
        replica_batches.append(list(ds.take(steps * replicas)))
        reads.append(store.reads)
    for step, (x, y) in enumerate(expected):
        # Worker w's replicas take its batches in turn: replica r at step s
        # gets its batch s * replicas + r; in worker, then replica order.
        parts = [replica_batches[w][step * replicas + r] for w in range(workers) for r in range(replicas)]
        assert all(p[0].shape[0] == batch // (workers * replicas) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x.numpy())
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y.numpy())
    # Decode work: each input pipeline read the records of its own share and
    # no others: those of the steps taken, and of a few more its prefetch
    # read ahead.
    width = batch // workers
    for w, worker_reads in enumerate(reads):
        own = [i for _, i in pairs(data.training_order(31, batch, 9, skip, (w, workers)),
                                   (steps + 8) * width)]
        assert not collections.Counter(worker_reads) - collections.Counter(own)
        assert not collections.Counter(own[:steps * width]) - collections.Counter(worker_reads)
    assert sum(map(len, reads)) < steps * batch + 8 * batch * workers


def test_mixup_across_replicas_of_the_stream_pipeline_is_refused(packed):
    loaded = sources.load_source(f"records:{packed}")
    context = tf.distribute.InputContext(1, 0, 2)
    with pytest.raises(ValueError, match="MixUp/CutMix mix the images of a whole global batch"):
        data.make_dataset(loaded, 16, 8, True, augment=augment.Augment(mixup=0.2),
                          one_hot=True, input_context=context)


def test_auto_pipeline_chooses_by_decoded_size():
    train = data.from_arrays(np.zeros((1000, 4, 4, 3), np.uint8), np.arange(1000) % 2)
    # 1,000 images at 64 px: 1000 x 64 x 64 x 12 bytes = 46.9 MB.
    assert data.choose_pipeline("auto", train, 64, 47)[0] == "memory"
    pipeline, why = data.choose_pipeline("auto", train, 64, 46)
    assert pipeline == "stream" and "47 MB, exceed data.cache_images_mb=46" in why
    assert data.choose_pipeline("auto", train, 64, 46, mixes=True)[0] == "memory"
    assert data.choose_pipeline("stream", train, 64, 1e6) == ("stream", "data.pipeline='stream'")
    from keras_ft import spec

    with pytest.raises(ValueError, match="data.pipeline"):
        spec.resolve(tiny_config({"data.pipeline": "disk"}))
    from configs import seg_tiny

    with pytest.raises(ValueError, match="'semantic_segmentation' holds its examples in memory"):
        spec.resolve(overridden(seg_tiny.get_config(), {"data.pipeline": "stream"}))


# ------------------------------------------------------------- bad input


def _copy(packed, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(packed, target)
    return str(target)


def test_a_changed_pack_is_refused_naming_the_file(packed, tmp_path):
    copy = _copy(packed, tmp_path)
    shard = os.path.join(copy, records.SHARD_PATTERN.format(1, 3))
    with open(shard, "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=f"{shard}: expected .* bytes"):
        records.open_records(copy)
    copy = _copy(packed, tmp_path / "b")
    labels = np.load(os.path.join(copy, records.LABELS))
    labels[0] = 1 - labels[0]
    np.save(os.path.join(copy, records.LABELS), labels)
    with pytest.raises(ValueError, match="labels.npy: SHA-256 differs"):
        records.open_records(copy)
    meta_path = os.path.join(copy, records.META)
    meta = json.load(open(meta_path))
    meta["format"] = "keras_ft.records/9"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ValueError, match="format 'keras_ft.records/9'"):
        records.open_records(copy)


def test_an_unfinished_or_missing_pack_says_how_to_write_one(tmp_path):
    with pytest.raises(ValueError, match="launch.pack --source=folder:IMAGES"):
        sources.load_source(f"records:{tmp_path}")
    (tmp_path / records.SHARD_PATTERN.format(0, 1)).write_bytes(b"")
    with pytest.raises(ValueError, match="an unfinished pack"):
        sources.load_source(f"records:{tmp_path}")


def test_pack_refuses_an_existing_out_and_leaves_no_partial_folder(folder, packed, tmp_path):
    with pytest.raises(ValueError, match="exists; remove it"):
        pack.run(f"folder:{folder}", packed)
    # A writer that fails midway leaves neither OUT nor a finished-looking pack.
    out = tmp_path / "broken"

    def blobs():
        yield b"\x89PNG"
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        records.write(str(out), blobs(), [0, 1], ["a", "b"], "test")
    assert not out.exists()
    assert not os.path.exists(os.path.join(str(out) + ".partial", records.META))
    with pytest.raises(ValueError, match="holds arrays images"):
        records.pack(data.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 1]), str(out), "x")


# ------------------------------------------------- TFDS prepared as ArrayRecord


def _store_tfds(data_dir, file_format):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)

    def split(n):
        images = rng.integers(0, 255, (n, 12, 10 + n % 3, 3), dtype=np.uint8)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(n) % 3})

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
    })
    tfds.dataset_builders.store_as_tfds_dataset(
        name="keras_ft_tiny", version="1.0.0", features=features,
        split_datasets={"train": split(12), "test": split(6)}, data_dir=str(data_dir),
        file_format=file_format,
    )


def test_tfds_in_array_record_is_read_by_index_as_tfrecord_is_into_memory(tmp_path):
    from keras_ft import tfds_source

    loaded = {}
    for file_format in ("array_record", "tfrecord"):
        _store_tfds(tmp_path / file_format, file_format)
        loaded[file_format] = tfds_source.from_tfds(
            "keras_ft_tiny", split="train", val_split="test", data_dir=str(tmp_path / file_format))
    by_index, in_memory = loaded["array_record"], loaded["tfrecord"]
    assert by_index.kind == data.RECORDS and in_memory.kind == data.ENCODED
    assert by_index.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(by_index.val_mask, in_memory.val_mask)
    # The same examples (TFDS stores both formats in one order).
    np.testing.assert_array_equal(by_index.labels, in_memory.labels)
    assert [by_index.images.read(i) for i in range(18)] == list(in_memory.images)
    assert by_index.images.store.name(13) == "keras_ft_tiny test #1"
    a = list(data.make_dataset(by_index, 8, 4, True, seed=2).take(3))
    b = list(data.make_dataset(in_memory, 8, 4, True, seed=2).take(3))
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_pack_cli_packs_and_bad_input_is_one_line_exit_2(folder, tmp_path):
    import subprocess
    import sys

    from conftest import REPO, error_line, train_env

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "launch.pack", *flags], cwd=REPO,
                              env=train_env(), capture_output=True, text=True, timeout=300)

    done = run(f"--source=folder:{folder}", f"--output_dir={tmp_path / 'out'}", "--shards=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Scanned 31 files in 3 classes: no bad files." in done.stderr
    assert f"records:{tmp_path / 'out'}" in done.stderr
    assert "oneDNN" not in done.stderr  # TensorFlow's start-up lines are not ours
    bad = run(f"--source=folder:{tmp_path / 'nowhere'}", f"--output_dir={tmp_path / 'x'}")
    assert bad.returncode == 2
    assert "does not exist" in error_line(bad) and not (tmp_path / "x").exists()


def test_the_stream_pipeline_applies_class_weights_inside_the_stream(tmp_path):
    from keras_ft import spec as spec_lib, validate
    from keras_ft.tasks import image_classification

    images = write_image_folder(tmp_path / "images", {"few": 4, "many": 12})
    weights = None
    for pipeline in ("memory", "stream"):
        spec = spec_lib.resolve(tiny_config({
            "data.source": f"folder:{images}", "data.pipeline": pipeline,
            "data.class_weights": True}))
        task_data = image_classification.ImageData(
            spec, *image_classification.load_splits(spec.data, spec.seed))
        assert task_data.pipeline == pipeline
        dataset, class_weight = task_data.train_input(tf.distribute.get_strategy())
        if pipeline == "memory":  # fit(class_weight=...) weights the loss
            weights = class_weight
            assert weights == validate.class_weights(task_data.train_set.labels, 2)
            assert weights[0] > 1 > weights[1]
            continue
        assert class_weight is None  # fit() cannot map a distributed dataset
        for x, y, w in itertools.islice(iter(dataset), 3):
            np.testing.assert_allclose(w.numpy(), [weights[int(label)] for label in y.numpy()])


EXITS_WITH_A_LIVE_STREAM = """
import sys
from keras_ft import data, sources
stream = iter(data.make_dataset(sources.load_source(sys.argv[1]), 16, 8, training=True))
for _ in range(50):
    next(stream)
print("read", flush=True)
"""


def test_a_process_exits_with_a_stream_of_records_still_open(packed):
    # tf.data's threads, inside tf.numpy_function, hung the interpreter's exit
    # (2 runs in 3) until reads stop at exit (keras_ft.data._Reads).
    import subprocess
    import sys

    from conftest import REPO, train_env

    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", EXITS_WITH_A_LIVE_STREAM, f"records:{packed}"],
                              cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout == "read\n", done.stderr[-2000:]
        assert "Traceback" not in done.stderr
