"""Data at scale: ArrayRecord packs read by index, the training order computed
at any step, each input pipeline reading only its share of every batch."""

import collections
import json
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from keras_ft import augment, data, records, sources
from launch import pack
from runs import tiny_config


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
