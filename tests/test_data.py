import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from keras_ft import data, sources


def test_split_is_seeded_stratified_and_disjoint(tmp_path):
    images = sources.from_folder(write_image_folder(tmp_path, {"a": 10, "b": 20}))
    train, val = data.split(images, 0.2, seed=3)
    again_train, again_val = data.split(images, 0.2, seed=3)
    other_train, _ = data.split(images, 0.2, seed=4)
    assert train.images == again_train.images and val.images == again_val.images
    assert train.images != other_train.images
    assert not set(train.images) & set(val.images)
    assert len(train) + len(val) == 30
    assert np.bincount(val.labels).tolist() == [2, 4]


def test_training_stream_is_seeded_by_pass_and_resumable(tmp_path):
    images = sources.from_folder(write_image_folder(tmp_path, {"a": 4, "b": 4}))
    stream = data.make_dataset(images, 16, batch_size=3, training=True, seed=7)
    batches = list(stream.take(6))  # 8 images: 2 whole batches a pass
    x, y = batches[0]
    assert x.shape == (3, 16, 16, 3) and x.dtype == tf.float32
    assert float(tf.reduce_min(x)) >= 0 and float(tf.reduce_max(x)) <= 255
    # A pass visits distinct images; passes come in different orders.
    first_pass = np.concatenate([b[0].numpy() for b in batches[:2]])
    assert len({a.tobytes() for a in first_pass}) == 6
    orders = [np.concatenate([b[1].numpy() for b in batches[i:i + 2]]) for i in (0, 2, 4)]
    assert not all(np.array_equal(orders[0], o) for o in orders[1:])
    # The same seed gives the same stream; skipping resumes it exactly.
    resumed = list(data.make_dataset(images, 16, 3, training=True, seed=7, skip_batches=4).take(2))
    for (a, la), (b, lb) in zip(batches[4:], resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())
    other = list(data.make_dataset(images, 16, 3, training=True, seed=8).take(2))
    assert not all(np.array_equal(a[0].numpy(), b[0].numpy()) for a, b in zip(batches, other))
    # Flips happen: some image appears mirrored relative to its evaluation copy.
    val = np.concatenate([b[0].numpy() for b in data.make_dataset(images, 16, 3, training=False)])
    assert len(val) == 8
    flipped = {a[:, ::-1].tobytes() for a in val} - {a.tobytes() for a in val}
    seen = {a.tobytes() for b in batches for a in b[0].numpy()}
    assert seen & flipped


def test_arrays_source_checks_shapes():
    x = np.zeros((4, 8, 8, 3), np.uint8)
    images = data.from_arrays(x, [0, 1, 0, 1], ["no", "yes"])
    assert len(images) == 4
    with pytest.raises(ValueError, match="labels"):
        data.from_arrays(x, [0, 1, 2, 1], ["no", "yes"])
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        data.from_arrays(np.zeros((4, 8, 8)), [0, 1, 0, 1])


def test_resize_matches_in_eager_and_tf_data():
    image = tf.constant(np.random.default_rng(0).integers(0, 256, (9, 13, 3)), tf.uint8)
    eager = data.resize_image(image, 8)
    mapped = next(iter(tf.data.Dataset.from_tensors(image).map(lambda i: data.resize_image(i, 8))))
    np.testing.assert_allclose(eager.numpy(), mapped.numpy(), atol=1e-5)


def _encoded(files: data.ImageSet) -> data.ImageSet:
    """The same images as `files`, held in memory as encoded bytes (as TFDS gives them)."""
    blobs = np.empty(len(files), object)
    blobs[:] = [open(p, "rb").read() for p in files.images]
    return data.ImageSet(blobs, files.labels, files.class_names, names=[f"#{i}" for i in range(len(files))])


def test_encoded_images_give_the_same_batches_as_their_files(tmp_path):
    files = sources.from_folder(write_image_folder(tmp_path, {"a": 3, "b": 4}))
    encoded = _encoded(files)
    assert (files.kind, encoded.kind) == (data.FILES, data.ENCODED)
    assert data.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 1]).kind == data.ARRAYS
    for training in (False, True):
        a = data.make_dataset(files, 16, 3, training=training, seed=5).take(3)
        b = data.make_dataset(encoded, 16, 3, training=training, seed=5).take(3)
        for (xa, ya), (xb, yb) in zip(a, b):
            np.testing.assert_array_equal(xa.numpy(), xb.numpy())
            np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    sub = encoded.subset(np.asarray([4, 0]))
    assert sub.names == ["#4", "#0"] and sub.images[0] == encoded.images[4]


def test_split_as_given_follows_the_mask_and_needs_training_images():
    images = np.zeros((6, 4, 4, 3), np.uint8)
    mask = np.asarray([False, False, True, False, False, True])
    given = data.ImageSet(images, np.asarray([0, 1, 0, 1, 0, 1], np.int32), ["a", "b"], val_mask=mask)
    train, val = data.split_as_given(given)
    assert train.labels.tolist() == [0, 1, 1, 0] and val.labels.tolist() == [0, 1]
    assert train.val_mask is None and val.val_mask is None
    b_only_in_val = np.asarray([False, True, False, False, False, True])
    no_b = data.ImageSet(images, np.asarray([0, 1, 0, 0, 0, 1], np.int32), ["a", "b"], val_mask=b_only_in_val)
    with pytest.raises(ValueError, match="Class 'b' has no training images in the source's own"):
        data.split_as_given(no_b)
    with pytest.raises(ValueError, match="own validation split has no images"):
        data.split_as_given(data.ImageSet(images, given.labels, ["a", "b"], val_mask=np.zeros(6, bool)))
