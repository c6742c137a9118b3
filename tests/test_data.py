import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from keras_ft import augment, data, sources


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


def _bands(height, width):
    """Red left quarter, green middle half, blue right quarter."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 4, 0] = 255
    image[:, width // 4: 3 * width // 4, 1] = 255
    image[:, 3 * width // 4:, 2] = 255
    return image


def test_resize_policies_on_a_known_image():
    wide = _bands(8, 16)  # 2:1
    for policy in data.RESIZE_POLICIES:
        out = data.resize_image(wide, 4, policy)
        assert out.shape == (4, 4, 3) and out.dtype == tf.float32, policy
    # "resize" squeezes the whole image: all three bands are still there.
    squeezed = data.resize_image(wide, 4, "resize").numpy()
    assert squeezed[..., 0].max() > 200 and squeezed[..., 2].max() > 200
    # A center crop of a 2:1 image is its middle square: green only.
    np.testing.assert_array_equal(
        data.resize_image(wide, 4, "center_crop").numpy(), np.tile([0.0, 255.0, 0.0], (4, 4, 1))
    )
    # A pad keeps the aspect ratio: the 4x2-scaled image between zero rows.
    padded = data.resize_image(wide, 4, "pad").numpy()
    np.testing.assert_array_equal(padded[[0, 3]], 0.0)
    np.testing.assert_allclose(padded[1:3], squeezed[:2], atol=1e-4)  # same 4-wide resize
    tall = data.resize_image(wide.transpose(1, 0, 2), 4, "pad").numpy()
    np.testing.assert_array_equal(tall[:, [0, 3]], 0.0)


def test_resize_then_crop_zooms_into_the_center():
    # Columns hold 8 x their index: the output's column j must show the
    # source column under its center. S = 8: the 16 x 32 image's short side
    # goes to round(8 / 0.875) = 9 (so 18 wide), then the central 8 x 8.
    assert data.resize_side(8, "resize_then_crop") == 9 and data.resize_side(8, "pad") == 8
    ramp = np.tile((np.arange(32) * 8)[None, :, None], (16, 1, 3)).astype(np.uint8)
    out = data.resize_image(ramp, 8, "resize_then_crop").numpy()
    left = (18 - 8) // 2
    centers = (left + np.arange(8) + 0.5) * 32 / 18 - 0.5
    np.testing.assert_allclose(out[4, :, 0], 8 * centers, atol=1.0)  # one column is 14 apart
    # On a square of side resize_side(S) the policy is a plain center crop.
    square = np.random.default_rng(0).integers(0, 256, (9, 9, 3)).astype(np.uint8)
    np.testing.assert_allclose(
        data.resize_image(square, 8, "resize_then_crop").numpy(), square[0:8, 0:8], atol=1e-3
    )


@pytest.mark.parametrize("policy", data.RESIZE_POLICIES)
def test_resize_policies_match_in_eager_tf_data_and_batches(policy):
    rng = np.random.default_rng(1)
    image = tf.constant(rng.integers(0, 256, (9, 13, 3)), tf.uint8)
    eager = data.resize_image(image, 8, policy)
    mapped = next(iter(tf.data.Dataset.from_tensors(image).map(lambda i: data.resize_image(i, 8, policy))))
    np.testing.assert_array_equal(eager.numpy(), mapped.numpy())
    # A batch of any size, as the SavedModel's uint8 signature gets it.
    serve = tf.function(
        lambda x: data.resize_image(x, 8, policy),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)],
    )
    batched = serve(tf.stack([image, image[::-1]]))
    assert batched.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(batched[0].numpy(), eager.numpy(), atol=1e-4)


def test_unknown_resize_policy_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="Unknown data.resize 'crop'. Choose one of: resize, center_crop"):
        data.resize_image(np.zeros((4, 4, 3), np.uint8), 4, "crop")
    images = data.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="data.resize"):
        data.make_dataset(images, 4, 2, training=False, resize="squash")


@pytest.mark.parametrize("policy", ["resize", "pad"])
def test_sized_images_in_memory_give_the_same_stream(tmp_path, policy):
    images = sources.from_folder(write_image_folder(tmp_path, {"a": 5, "b": 6}, size=21))
    sized = data.size_all(images, 16, policy)
    assert sized.shape == (11, 16, 16, 3) and sized.dtype == np.float32
    heavy = augment.Augment(randaugment_ops=2)
    for kwargs in (dict(training=False), dict(training=True, seed=3, skip_batches=2),
                   dict(training=True, seed=3, augment=heavy)):
        decoded = data.make_dataset(images, 16, 4, resize=policy, **kwargs).take(4)
        cached = data.make_dataset(images, 16, 4, resize=policy, sized=sized, **kwargs).take(4)
        for (x, y), (cx, cy) in zip(decoded, cached):
            np.testing.assert_array_equal(x.numpy(), cx.numpy())
            np.testing.assert_array_equal(y.numpy(), cy.numpy())
    with pytest.raises(ValueError, match="random_resized_crop needs the original images"):
        data.make_dataset(images, 16, 4, training=True, sized=sized,
                          augment=augment.Augment(random_resized_crop=(0.5, 1.0)))
    with pytest.raises(ValueError, match=r"sized images have shape \(11, 16, 16, 3\), expected"):
        data.make_dataset(images, 8, 4, training=False, sized=sized)


def test_per_class_draws_nested_subsets_and_names_a_short_class():
    images = np.zeros((30, 4, 4, 3), np.uint8)
    labels = np.array([0] * 20 + [1] * 10)
    ds = data.from_arrays(images, labels, ["a", "b"])
    small = data.per_class(ds, 3, seed=0)
    large = data.per_class(ds, 8, seed=0)
    assert np.bincount(small.labels).tolist() == [3, 3]
    # A smaller count keeps a subset of a larger one's images (learning curves).
    ds.images[:] = np.arange(30).reshape(30, 1, 1, 1)
    small, large = data.per_class(ds, 3, 0), data.per_class(ds, 8, 0)
    assert set(small.images[:, 0, 0, 0]) <= set(large.images[:, 0, 0, 0])
    assert set(small.images[:, 0, 0, 0]) != set(data.per_class(ds, 3, 1).images[:, 0, 0, 0])
    with pytest.raises(ValueError, match=r"data.train_per_class=11, but class 'b' has 10"):
        data.per_class(ds, 11, 0)
