"""Tests for keras_chex.cifar.data."""

import os
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from keras_chex.cifar import data as datasets

CLASSES = datasets.CLASS_NAMES
# Deliberately not in sorted order: the split must follow sorted file names,
# not the order in which files were written.
FILE_NAMES = ("0002.jpg", "0000.jpg", "0001.jpg")


def _encode(image):
    return tf.io.encode_jpeg(image, quality=95).numpy()


def _decode(data):
    return tf.io.decode_jpeg(data, channels=3).numpy()


@pytest.fixture(scope="module")
def tiny_jpegs():
    """{(class, file name): JPEG bytes} for 3 random images per class."""
    rng = np.random.default_rng(0)
    return {
        (class_name, file_name): _encode(
            rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        )
        for class_name in CLASSES
        for file_name in FILE_NAMES
    }


def _write_zip(path, jpegs, prefix="train/"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("README.md", "not an image")
        for (class_name, file_name), data in jpegs.items():
            archive.writestr(f"{prefix}{class_name}/{file_name}", data)
    return path


def _write_folder(root, jpegs):
    for (class_name, file_name), data in jpegs.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        (root / class_name / file_name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory, tiny_jpegs):
    return _write_zip(tmp_path_factory.mktemp("zip") / "tiny.zip", tiny_jpegs)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_jpegs):
    root = tmp_path_factory.mktemp("folder")
    _write_folder(root / "train", tiny_jpegs)
    return root


def _expected_split(jpegs, validation_per_class):
    """Decodes the tiny data set independently of the loader and splits it."""
    train_x, train_y, val_x, val_y = [], [], [], []
    for label, class_name in enumerate(CLASSES):
        names = sorted(FILE_NAMES)
        cut = len(names) - validation_per_class
        for i, file_name in enumerate(names):
            image = _decode(jpegs[(class_name, file_name)])
            (train_x if i < cut else val_x).append(image)
            (train_y if i < cut else val_y).append(label)
    return (np.stack(train_x), np.array(train_y)), (
        np.stack(val_x),
        np.array(val_y),
    )


def _assert_splits_equal(actual, expected):
    for (x, y), (x_expected, y_expected) in zip(actual, expected):
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, x_expected)
        np.testing.assert_array_equal(y, y_expected)


def test_sample_has_400_train_and_100_val_images_per_class():
    (x_train, y_train), (x_val, y_val) = datasets.load_cifar10()

    assert x_train.shape == (4000, 32, 32, 3)
    assert x_val.shape == (1000, 32, 32, 3)
    assert x_train.dtype == x_val.dtype == np.uint8
    assert y_train.dtype == y_val.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_val), [100] * 10)
    # Real photographs, not blank placeholders.
    assert x_train.std() > 30


def test_sample_holds_first_400_and_last_100_images_of_each_class():
    with zipfile.ZipFile(datasets.SAMPLE_PATH) as archive:
        names = archive.namelist()

    for class_name in CLASSES:
        numbers = sorted(
            int(n.rsplit("/", 1)[1][:4])
            for n in names
            if n.startswith(f"train/{class_name}/")
        )
        assert numbers == list(range(400)) + list(range(4900, 5000))


def test_write_sample_keeps_first_and_last_images_byte_for_byte(tmp_path):
    output = tmp_path / "small.zip"
    assert datasets.write_sample(datasets.SAMPLE_PATH, output, 3, 2) == 50
    with zipfile.ZipFile(datasets.SAMPLE_PATH) as full, \
            zipfile.ZipFile(output) as small:
        for class_name in CLASSES:
            names = sorted(n for n in full.namelist()
                           if n.startswith(f"train/{class_name}/"))
            kept = sorted(n for n in small.namelist()
                          if n.startswith(f"train/{class_name}/"))
            assert kept == names[:3] + names[-2:]
            assert all(small.read(n) == full.read(n) for n in kept)
    # Byte-identical when written again (fixed timestamps).
    again = tmp_path / "again.zip"
    datasets.write_sample(datasets.SAMPLE_PATH, again, 3, 2)
    assert again.read_bytes() == output.read_bytes()
    (x, y), (xv, yv) = datasets.load_cifar10(output, validation_per_class=2)
    np.testing.assert_array_equal(np.bincount(y), [3] * 10)
    np.testing.assert_array_equal(np.bincount(yv), [2] * 10)


def test_write_sample_asking_for_too_many_writes_nothing(tmp_path):
    output = tmp_path / "small.zip"
    with pytest.raises(ValueError,
                       match="train_per_class=450 plus val_per_class=100"):
        datasets.write_sample(datasets.SAMPLE_PATH, output, 450, 100)
    assert not output.exists()


def test_sample_validation_per_class_can_be_overridden():
    (x_train, y_train), (x_val, y_val) = datasets.load_cifar10(
        validation_per_class=250
    )

    np.testing.assert_array_equal(np.bincount(y_train), [250] * 10)
    np.testing.assert_array_equal(np.bincount(y_val), [250] * 10)


def test_zip_and_folder_give_the_decoded_images_in_sorted_order(
    tiny_zip, tiny_folder, tiny_jpegs
):
    expected = _expected_split(tiny_jpegs, validation_per_class=1)

    from_zip = datasets.load_cifar10(tiny_zip, validation_per_class=1)
    from_folder = datasets.load_cifar10(tiny_folder, validation_per_class=1)
    from_class_folders = datasets.load_cifar10(
        tiny_folder / "train", validation_per_class=1
    )

    _assert_splits_equal(from_zip, expected)
    _assert_splits_equal(from_folder, expected)
    _assert_splits_equal(from_class_folders, expected)


def test_validation_holds_out_the_last_files_of_each_class(
    tiny_zip, tiny_jpegs
):
    (x_train, y_train), (x_val, y_val) = datasets.load_cifar10(
        tiny_zip, validation_per_class=1
    )

    np.testing.assert_array_equal(y_val, np.arange(10))
    for label, class_name in enumerate(CLASSES):
        last = _decode(tiny_jpegs[(class_name, "0002.jpg")])
        np.testing.assert_array_equal(x_val[label], last)
        assert not any(np.array_equal(last, x) for x in x_train)


def test_zip_without_train_folder_is_accepted(tmp_path, tiny_jpegs):
    path = _write_zip(tmp_path / "flat.zip", tiny_jpegs, prefix="")

    actual = datasets.load_cifar10(path, validation_per_class=2)

    _assert_splits_equal(actual, _expected_split(tiny_jpegs, 2))


def test_zero_validation_gives_empty_validation_arrays(tiny_zip):
    (x_train, _), (x_val, y_val) = datasets.load_cifar10(
        tiny_zip, validation_per_class=0
    )

    assert x_train.shape == (30, 32, 32, 3)
    assert x_val.shape == (0, 32, 32, 3)
    assert y_val.shape == (0,)


def _fail_if_called(*args):
    raise AssertionError("images were decoded")


@pytest.mark.parametrize("value", [3, 100])
def test_validation_leaving_no_training_images_is_rejected_early(
    tiny_zip, value, monkeypatch
):
    monkeypatch.setattr(datasets, "_decode_jpegs", _fail_if_called)

    with pytest.raises(datasets.ValidationSplitError,
                       match=f"validation_per_class={value}") as raised:
        datasets.load_cifar10(tiny_zip, validation_per_class=value)
    # A caller can name its own argument for the count.
    error = raised.value
    assert (error.value, error.images) == (value, 3)
    assert error.describe("--held_out").startswith(
        f"--held_out={value} leaves no training images")
    assert "Pass a value below 3." in error.describe("--held_out")


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_invalid_validation_per_class_is_rejected(tiny_zip, value):
    with pytest.raises(ValueError, match="validation_per_class"):
        datasets.load_cifar10(tiny_zip, validation_per_class=value)


def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.zip"

    with pytest.raises(FileNotFoundError, match="nowhere.zip"):
        datasets.load_cifar10(missing)


def test_file_that_is_not_a_zip_is_rejected(tmp_path):
    path = tmp_path / "train.tar"
    path.write_bytes(b"not a zip archive")

    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        datasets.load_cifar10(path)


def test_missing_classes_are_named(tmp_path, tiny_jpegs):
    without_cats = {k: v for k, v in tiny_jpegs.items() if k[0] != "cat"}
    path = _write_zip(tmp_path / "no_cats.zip", without_cats)

    with pytest.raises(ValueError, match=r"layout.*no JPEG images for cat\b"):
        datasets.load_cifar10(path)


def test_unexpected_class_folders_are_named(tmp_path, tiny_jpegs):
    root = _write_folder(tmp_path / "data", tiny_jpegs)
    _write_folder(root, {("apple", "0000.jpg"): b"any bytes"})

    with pytest.raises(ValueError, match="not CIFAR-10 classes: apple"):
        datasets.load_cifar10(root)


def test_empty_folder_is_rejected_with_the_expected_layout(tmp_path):
    with pytest.raises(ValueError, match=r"train/<class>/<image>\.jpg"):
        datasets.load_cifar10(tmp_path)


def test_undecodable_image_is_named(tmp_path, tiny_jpegs):
    broken = dict(tiny_jpegs)
    broken[("dog", "0001.jpg")] = b"this is not a JPEG"
    path = _write_zip(tmp_path / "broken.zip", broken)

    with pytest.raises(ValueError, match=r"cannot decode dog/0001\.jpg"):
        datasets.load_cifar10(path, validation_per_class=1)


def test_image_of_the_wrong_size_is_named(tmp_path, tiny_jpegs):
    wrong = dict(tiny_jpegs)
    wrong[("frog", "0000.jpg")] = _encode(np.zeros((16, 24, 3), np.uint8))
    path = _write_zip(tmp_path / "wrong.zip", wrong)

    with pytest.raises(ValueError, match=r"frog/0000\.jpg is 24x16 pixels"):
        datasets.load_cifar10(path, validation_per_class=1)


def test_cache_is_reused_and_never_written_next_to_the_source(
    tmp_path, tiny_jpegs, monkeypatch
):
    (tmp_path / "source").mkdir()
    source = _write_zip(tmp_path / "source" / "tiny.zip", tiny_jpegs)
    cache_dir = tmp_path / "cache"
    first = datasets.load_cifar10(
        source, validation_per_class=1, cache_dir=cache_dir
    )

    monkeypatch.setattr(datasets, "_decode_jpegs", _fail_if_called)
    second = datasets.load_cifar10(
        source, validation_per_class=1, cache_dir=cache_dir
    )
    # The cache holds every image; the split is made after reading it.
    other_split = datasets.load_cifar10(
        source, validation_per_class=2, cache_dir=cache_dir
    )

    _assert_splits_equal(second, first)
    _assert_splits_equal(other_split, _expected_split(tiny_jpegs, 2))
    assert len(list(cache_dir.glob("*.npz"))) == 1
    assert os.listdir(tmp_path / "source") == ["tiny.zip"]


def test_cache_is_rebuilt_when_the_source_changes(tmp_path, tiny_jpegs):
    source = _write_zip(tmp_path / "tiny.zip", tiny_jpegs)
    cache_dir = tmp_path / "cache"
    datasets.load_cifar10(source, cache_dir=cache_dir, validation_per_class=1)

    changed = dict(tiny_jpegs)
    changed[("ship", "0002.jpg")] = _encode(np.full((32, 32, 3), 7, np.uint8))
    _write_zip(source, changed)
    stat = source.stat()
    # Also move the mtime, in case both writes land in the same tick.
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    actual = datasets.load_cifar10(
        source, cache_dir=cache_dir, validation_per_class=1
    )

    _assert_splits_equal(actual, _expected_split(changed, 1))
    assert len(list(cache_dir.glob("*.npz"))) == 2


def test_corrupt_cache_file_is_ignored(tmp_path, tiny_zip, tiny_jpegs):
    cache_dir = tmp_path / "cache"
    datasets.load_cifar10(tiny_zip, cache_dir=cache_dir, validation_per_class=1)
    (cache_file,) = cache_dir.glob("*.npz")
    cache_file.write_bytes(b"truncated")

    actual = datasets.load_cifar10(
        tiny_zip, cache_dir=cache_dir, validation_per_class=1
    )

    _assert_splits_equal(actual, _expected_split(tiny_jpegs, 1))


# make_dataset ---------------------------------------------------------------


def _examples(num_images=20, size=8):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(num_images, size, size, 3), dtype=np.uint8)
    # Unique labels identify which image each output came from.
    y = np.arange(num_images, dtype=np.int64)
    return x, y


def _collect(dataset):
    batches = list(dataset.as_numpy_iterator())
    return (
        np.concatenate([images for images, _ in batches]),
        np.concatenate([labels for _, labels in batches]),
        [len(labels) for _, labels in batches],
    )


def test_validation_dataset_keeps_order_and_scales_to_unit_range():
    x, y = _examples()

    dataset = datasets.make_dataset(x, y, 8, training=False)
    images, labels, batch_sizes = _collect(dataset)

    assert dataset.element_spec[0].dtype == tf.float32
    assert batch_sizes == [8, 8, 4]
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_allclose(images, x / 255.0, rtol=1e-6)


def test_training_dataset_without_augmentation_is_a_permutation():
    x, y = _examples()

    images, labels, _ = _collect(
        datasets.make_dataset(x, y, 8, training=True, seed=3, augment=False)
    )

    assert not np.array_equal(labels, y)
    assert sorted(labels) == list(y)
    np.testing.assert_allclose(images, x[labels] / 255.0, rtol=1e-6)


def _crops_and_flips(image, padding=4):
    """Every image the standard CIFAR augmentation can make from `image`."""
    size = image.shape[0]
    padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[top : top + size, left : left + size]
            yield crop
            yield crop[:, ::-1]


def test_augmented_images_are_padded_crops_or_their_flips():
    x, y = _examples()

    images, labels, _ = _collect(
        datasets.make_dataset(x, y, 8, training=True, seed=5)
    )

    assert images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    pixels = np.round(images * 255).astype(np.uint8)
    for image, label in zip(pixels, labels):
        assert any(
            np.array_equal(image, c) for c in _crops_and_flips(x[label])
        )
    # With 20 images, at least one is shifted or flipped.
    assert not np.array_equal(pixels, x[labels])


def test_training_dataset_is_reproducible_for_a_seed():
    x, y = _examples()

    def run(seed):
        dataset = datasets.make_dataset(x, y, 8, training=True, seed=seed)
        return [_collect(dataset)[:2] for _ in range(2)]  # Two epochs.

    (epoch1, epoch2), (again1, again2), (other1, _) = run(7), run(7), run(8)

    for actual, expected in ((again1, epoch1), (again2, epoch2)):
        np.testing.assert_array_equal(actual[0], expected[0])
        np.testing.assert_array_equal(actual[1], expected[1])
    # New order every epoch, and a different order for another seed.
    assert not np.array_equal(epoch1[1], epoch2[1])
    assert not np.array_equal(epoch1[1], other1[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"y": np.arange(3)}, "one label per image"),
        ({"x": np.zeros((20, 8, 8, 3), np.float32)}, "uint8"),
        ({"x": np.zeros((20, 8, 8), np.uint8)}, "`x` must be a batch"),
        ({"batch_size": 0}, "batch_size"),
        ({"training": "yes"}, "training"),
    ],
)
def test_make_dataset_rejects_invalid_arguments(kwargs, message):
    x, y = _examples()
    arguments = {"x": x, "y": y, "batch_size": 8, "training": True, **kwargs}

    with pytest.raises(ValueError, match=message):
        datasets.make_dataset(**arguments)


def test_download_option_splits_like_local_copies(monkeypatch):
    import keras

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (60, 32, 32, 3), dtype=np.uint8)
    y = np.repeat(np.arange(10), 6).reshape(-1, 1)
    monkeypatch.setattr(keras.datasets.cifar10, "load_data",
                        lambda: ((x, y), (x[:1], y[:1])))
    (xt, yt), (xv, yv) = datasets.load_cifar10("download",
                                               validation_per_class=2)
    assert len(xt) == 40 and len(xv) == 20
    assert np.bincount(yv).tolist() == [2] * 10
    # The held-out images are the last ones of each class.
    np.testing.assert_array_equal(xv[:2], x[4:6])


def test_first_per_class_keeps_the_first_of_each_class_in_order():
    y = np.array([2, 0, 2, 1, 0, 2, 1, 0])
    x = np.arange(len(y)) * 10
    xs, ys = datasets.first_per_class(x, y, 2)
    np.testing.assert_array_equal(xs, [0, 10, 20, 30, 40, 60])
    np.testing.assert_array_equal(ys, [2, 0, 2, 1, 0, 1])
    xs, ys = datasets.first_per_class(x, y, 0)
    assert xs is x and ys is y


def test_accuracy_counts_the_highest_score_per_example():
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    scores = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0],
                       [0.3, 0.2, 0.1]], "float32")
    labels = np.array([1, 0, 1, 2])
    batches = tf.data.Dataset.from_tensor_slices((scores, labels)).batch(3)
    assert datasets.accuracy(model, batches) == 0.5
