"""CIFAR-10 from local JPEG files, with no network access.

`keras.datasets.cifar10.load_data()` downloads the data set, which is not
possible on offline machines. `load_cifar10` reads the same images from a
local copy instead: a zip archive or a folder laid out as

    train/airplane/0000.jpg ... train/truck/4999.jpg

(the layout `keras.utils.image_dataset_from_directory` expects). Without a
path it reads a small real sample shipped inside the package, so examples and
tests run anywhere.

There is no test split in that layout, so the last images of each class (by
sorted file name) are held out for validation.
"""

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

# Alphabetical, which is also the label order of the original data set and of
# `keras.utils.image_dataset_from_directory`.
CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SHAPE = (32, 32, 3)

SAMPLE_PATH = (Path(__file__).resolve().parent.parent / "data"
               / "cifar10_sample.zip")
DEFAULT_VALIDATION_PER_CLASS = 500
# The sample holds 500 images per class, so the full data set's default
# would leave nothing to train on.
SAMPLE_VALIDATION_PER_CLASS = 100

_LAYOUT = "`train/<class>/<image>.jpg` (or `<class>/<image>.jpg`)"
_JPEG_SUFFIXES = (".jpg", ".jpeg")
_DECODE_BATCH_SIZE = 4096
# Bump when the cached arrays change meaning, so stale caches are ignored.
_CACHE_VERSION = 1


def load_cifar10(path=None, *, validation_per_class=None, cache_dir=None):
    """Loads CIFAR-10 images from a local zip archive or folder.

    The source holds one folder per class, named after `CLASS_NAMES`, either
    under a top-level `train/` folder or directly at its root. Images are
    decoded to RGB; labels follow the order of `CLASS_NAMES`. Within each
    class the images are sorted by file name and the last
    `validation_per_class` of them form the validation split.

    Both splits are ordered class by class (all airplanes first); shuffle
    them before training, for example with `make_dataset`.

    Args:
        path: "download" to fetch the original data set with
            `keras.datasets.cifar10.load_data()` (needs internet; the
            held-out part is then cut from its training split the same
            way), or a path to a zip archive or a folder with the layout
            above, for
            example the 50,000-image `train.zip` of CIFAR-10. `None` reads
            the sample shipped with the package: 500 real images per class
            (the first 400 and the last 100 of the full data set's classes).
        validation_per_class: Number of images per class to hold out for
            validation, taken from the end of each class. `None` means 500
            for a given `path` and 100 for the shipped sample, so that the
            sample's validation images are also validation images of the
            full data set. `0` gives empty validation arrays.
        cache_dir: Optional folder for a cache of the decoded images. The
            cache file is keyed by the source's path, size and modification
            time, so a changed source is decoded again. Nothing is ever
            written next to the source.

    Returns:
        `((x_train, y_train), (x_val, y_val))`: `uint8` image arrays of
        shape `(num_images, 32, 32, 3)` and `int64` label arrays of shape
        `(num_images,)`.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If `path` is not a zip archive or folder with the layout
            above, an image cannot be decoded as a 32x32 JPEG, or
            `validation_per_class` leaves a class without training images.

    Example:

    >>> (x_train, y_train), (x_val, y_val) = load_cifar10()
    >>> x_train.shape, x_val.shape
    ((4000, 32, 32, 3), (1000, 32, 32, 3))
    """
    if path == "download":
        return _download(validation_per_class)
    if path is None:
        path = SAMPLE_PATH
        default_validation = SAMPLE_VALIDATION_PER_CLASS
    else:
        default_validation = DEFAULT_VALIDATION_PER_CLASS
    if validation_per_class is None:
        validation_per_class = default_validation
    _check_validation_per_class(validation_per_class)

    source = open_source(path)
    # Checked before decoding, which takes seconds for the full data set.
    _check_validation_fits(source.files_by_class, validation_per_class, path)
    images, labels = _load_all(source, cache_dir)
    return _split(images, labels, validation_per_class)


def make_dataset(x, y, batch_size, *, training, seed=None, augment=True):
    """Builds a `tf.data` pipeline of CIFAR images for `model.fit`.

    Images are converted to `float32` and scaled to `[0, 1]` (divided by
    255; not standardised). For training, the examples are reshuffled every
    epoch and, with `augment=True`, get the standard CIFAR augmentation of
    He et al. (2016): zero-pad 4 pixels on each side, take a random crop of
    the original size, and flip horizontally with probability 0.5. For
    validation the examples keep their order and are not augmented.

    Args:
        x: `uint8` images of shape `(num_images, height, width, channels)`,
            as returned by `load_cifar10`.
        y: Labels of shape `(num_images,)`.
        batch_size: Number of examples per batch. The last batch may be
            smaller.
        training: Whether to shuffle and augment (`True`) or to keep the
            order and leave the images as they are (`False`).
        seed: Optional integer seed for the shuffle and the augmentation.
            With a seed, the pipeline yields the same sequence of batches
            every time it is built.
        augment: Whether to augment the training images. Ignored when
            `training=False`.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` batches, prefetched.

    Example:

    >>> (x_train, y_train), (x_val, y_val) = load_cifar10()
    >>> train = make_dataset(x_train, y_train, 128, training=True, seed=1)
    >>> val = make_dataset(x_val, y_val, 256, training=False)
    >>> images, labels = next(iter(train))
    >>> images.shape, images.dtype.name
    (TensorShape([128, 32, 32, 3]), 'float32')
    """
    x, y = _check_examples(x, y)
    _check_batch_size(batch_size)
    if not isinstance(training, bool):
        raise ValueError(
            f"`training` must be True or False, got {training!r}."
        )

    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(
            len(x), seed=seed, reshuffle_each_iteration=True
        )
        if augment:
            dataset = _augment(dataset, seed)
    # Scaling after batching converts a whole batch in one op.
    dataset = dataset.batch(batch_size).map(
        _scale_images, num_parallel_calls=tf.data.AUTOTUNE
    )
    return dataset.prefetch(tf.data.AUTOTUNE)


def first_per_class(x, y, per_class):
    """The first `per_class` examples of each class, in their order.

    Args:
        x: examples (first axis), e.g. images from `load_cifar10`.
        y: integer labels, one per example.
        per_class: how many to keep per class; 0 or None keeps everything.

    Returns:
        `(x, y)` restricted to those examples.

    Example:

    ```python
    x, y = first_per_class(x, y, 1000)  # 10,000 CIFAR-10 images.
    ```
    """
    if not per_class:
        return x, y
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class]
                                   for c in np.unique(y)]))
    return x[keep], y[keep]


def accuracy(model, dataset):
    """Top-1 accuracy of a classifier (logits or probabilities) on batches.

    Args:
        model: a Keras model mapping images to one score per class.
        dataset: `(x, y)` batches, e.g. from `make_dataset(training=False)`.

    Returns:
        The fraction of examples whose highest score is their label.

    Example:

    ```python
    print(accuracy(compact, make_dataset(x_val, y_val, 500, training=False)))
    ```
    """
    correct = total = 0
    for x, y in dataset:
        pred = np.argmax(model(x, training=False), -1)
        correct += int(np.sum(pred == np.asarray(y)))
        total += len(y)
    return correct / total


def open_source(path):
    """Indexes the CIFAR-10 images of a zip archive or folder.

    `load_cifar10` reads its images through this; it is public for tools
    that need the file names, such as `tools/make_cifar10_sample.py`.

    Args:
        path: Path to a zip archive or a folder with the layout
            `train/<class>/<image>.jpg` or `<class>/<image>.jpg`.

    Returns:
        An object with a `files_by_class` dict, mapping each name of
        `CLASS_NAMES` to the names of its images sorted by file name, and a
        `read(names)` method returning the bytes of those images.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If `path` is neither a folder nor a zip archive, or its
            layout is not the one above.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _FolderSource(path)
    if not path.exists():
        raise FileNotFoundError(
            f"CIFAR-10 source not found: {path}. Pass the path of a zip "
            f"archive or folder laid out as {_LAYOUT}, or path=None for the "
            "sample shipped with keras_chex."
        )
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"CIFAR-10 source {path} is neither a folder nor a zip archive. "
            f"Pass a zip archive or folder laid out as {_LAYOUT}."
        )
    return _ZipSource(path)


class _ZipSource:
    """The CIFAR-10 images inside a zip archive.

    Args:
        path: Path to the zip archive.
    """

    def __init__(self, path):
        self.path = Path(path)
        with zipfile.ZipFile(self.path) as archive:
            names = [
                info.filename
                for info in archive.infolist()
                if not info.is_dir()
            ]
        self._prefix = (
            "train/" if any(n.startswith("train/") for n in names) else ""
        )
        relative_names = [
            name[len(self._prefix) :]
            for name in names
            if name.startswith(self._prefix)
        ]
        self.files_by_class = _group_by_class(relative_names, self.path)

    def read(self, names):
        """Returns the bytes of the images `names` (as in `files_by_class`)."""
        with zipfile.ZipFile(self.path) as archive:
            return [archive.read(self._prefix + name) for name in names]

    def fingerprint(self):
        """Returns a string that changes when the archive changes."""
        stat = self.path.stat()
        return f"zip:{self.path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class _FolderSource:
    """The CIFAR-10 images in a folder.

    Args:
        path: Path to a folder that contains `train/<class>/` folders, or
            the class folders directly.
    """

    def __init__(self, path):
        self.path = Path(path)
        train = self.path / "train"
        self._root = train if train.is_dir() else self.path
        # Only two levels are listed: walking a whole tree could take
        # minutes if the user passes a large unrelated folder.
        relative_names = [
            f"{class_dir.name}/{entry.name}"
            for class_dir in _subfolders(self._root)
            for entry in os.scandir(class_dir.path)
            if entry.is_file()
        ]
        self.files_by_class = _group_by_class(relative_names, self.path)

    def read(self, names):
        """Returns the bytes of the images `names` (as in `files_by_class`)."""
        return [(self._root / name).read_bytes() for name in names]

    def fingerprint(self):
        """Returns a string that changes when an image file changes."""
        # A folder's own mtime misses edits to the files inside it, so every
        # image file contributes its size and mtime.
        digest = hashlib.sha256()
        for names in self.files_by_class.values():
            for name in names:
                stat = (self._root / name).stat()
                entry = f"{name}:{stat.st_size}:{stat.st_mtime_ns};"
                digest.update(entry.encode())
        return f"folder:{self._root.resolve()}:{digest.hexdigest()}"


# A fixed timestamp makes a written sample byte-identical on every run, so
# regenerating one does not show up as a change in version control.
_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def sample_names(names, train_per_class, val_per_class):
    """The first `train_per_class` and last `val_per_class` of `names`.

    Args:
        names: Image names of one class, sorted.
        train_per_class: Number of names to take from the start.
        val_per_class: Number of names to take from the end.

    Returns:
        The selected names, in their original order.

    Raises:
        ValueError: If the two parts would overlap.

    Example:

    >>> sample_names(["a", "b", "c", "d"], 2, 1)
    ['a', 'b', 'd']
    """
    if train_per_class + val_per_class > len(names):
        raise ValueError(
            f"train_per_class={train_per_class} plus val_per_class="
            f"{val_per_class} exceeds the {len(names)} images of a class."
        )
    tail = names[len(names) - val_per_class:] if val_per_class else []
    return names[:train_per_class] + tail


def write_sample(source, output, train_per_class, val_per_class):
    """Writes a smaller CIFAR-10 archive: per class, the first
    `train_per_class` and the last `val_per_class` images of `source`.

    The images keep their names and JPEG bytes (nothing is re-encoded), so
    the held-out images of the sample are held out of `source`'s training
    split too (`load_cifar10` holds out the last images of each class).

    Args:
        source: A path, or a source returned by `open_source`.
        output: Path of the zip archive to write.
        train_per_class: Images per class taken from the start.
        val_per_class: Images per class taken from the end.

    Returns:
        The number of images written.

    Raises:
        ValueError: If a class has fewer images than asked for (nothing is
            written then).

    Example:

    ```python
    write_sample("train.zip", "small.zip", 24, 6)
    (x, y), (xv, yv) = load_cifar10("small.zip", validation_per_class=6)
    ```
    """
    if isinstance(source, (str, os.PathLike)):
        source = open_source(source)
    # Selected before the output is opened, so that bad arguments leave no
    # half-written archive behind.
    selected = [
        sample_names(source.files_by_class[class_name], train_per_class,
                     val_per_class)
        for class_name in CLASS_NAMES
    ]
    count = 0
    with zipfile.ZipFile(output, "w", zipfile.ZIP_STORED) as archive:
        for names in selected:
            for name, data in zip(names, source.read(names)):
                # JPEG data does not compress further; storing keeps the
                # archive fast to read.
                info = zipfile.ZipInfo(f"train/{name}", date_time=_TIMESTAMP)
                archive.writestr(info, data, compress_type=zipfile.ZIP_STORED)
                count += 1
    return count


def _subfolders(path):
    return [
        entry
        for entry in os.scandir(path)
        if entry.is_dir() and not _is_hidden(entry.name)
    ]


def _is_hidden(name):
    # Archivers and file managers add entries like `.DS_Store` and
    # `__MACOSX/`; they are not part of the data set.
    return name.startswith(".") or name == "__MACOSX"


def _group_by_class(relative_names, path):
    """Groups `<class>/<image>.jpg` names by class, sorted by file name.

    Files elsewhere (a README at the root, hidden files) are ignored.
    """
    groups = {}
    for name in relative_names:
        parts = name.split("/")
        if len(parts) != 2 or any(_is_hidden(part) for part in parts):
            continue
        class_name, file_name = parts
        if file_name.lower().endswith(_JPEG_SUFFIXES):
            groups.setdefault(class_name, []).append(name)

    unexpected = sorted(set(groups) - set(CLASS_NAMES))
    missing = [c for c in CLASS_NAMES if c not in groups]
    if unexpected or missing:
        problems = []
        if missing:
            problems.append(f"no JPEG images for {', '.join(missing)}")
        if unexpected:
            names = ", ".join(unexpected)
            problems.append(f"folders that are not CIFAR-10 classes: {names}")
        raise ValueError(
            f"{path} does not have the CIFAR-10 layout {_LAYOUT} with one "
            f"folder per class ({', '.join(CLASS_NAMES)}): found "
            f"{'; '.join(problems)}."
        )
    return {c: sorted(groups[c]) for c in CLASS_NAMES}


def _load_all(source, cache_dir):
    """Returns all images and labels of `source`, class by class."""
    cache_file = None
    if cache_dir is not None:
        cache_file = _cache_file(source, cache_dir)
        cached = _read_cache(cache_file)
        if cached is not None:
            return cached

    names = [n for c in CLASS_NAMES for n in source.files_by_class[c]]
    labels = np.concatenate(
        [
            np.full(len(source.files_by_class[c]), label, dtype=np.int64)
            for label, c in enumerate(CLASS_NAMES)
        ]
    )
    images = _decode_jpegs(source.read(names), names, source.path)
    if cache_file is not None:
        _write_cache(cache_file, images, labels)
    return images, labels


def _decode_jpegs(blobs, names, path):
    """Decodes JPEG bytes to a `(len(blobs), 32, 32, 3)` uint8 array."""
    try:
        return _decode_batched(blobs)
    except tf.errors.OpError:
        # The parallel decoder does not say which file failed; find it so
        # the user gets a file name rather than a TensorFlow trace.
        for blob, name in zip(blobs, names):
            _decode_one(blob, name, path)
        raise


def _decode_batched(blobs):
    def decode(blob):
        image = tf.io.decode_jpeg(blob, channels=IMAGE_SHAPE[-1])
        return tf.ensure_shape(image, IMAGE_SHAPE)

    dataset = (
        tf.data.Dataset.from_tensor_slices(tf.constant(blobs, dtype=tf.string))
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(_DECODE_BATCH_SIZE)
    )
    images = np.empty((len(blobs),) + IMAGE_SHAPE, dtype=np.uint8)
    start = 0
    for batch in dataset.as_numpy_iterator():
        images[start : start + len(batch)] = batch
        start += len(batch)
    return images


def _decode_one(blob, name, path):
    try:
        image = tf.io.decode_jpeg(blob, channels=IMAGE_SHAPE[-1])
    except tf.errors.OpError as error:
        raise ValueError(
            f"{path}: cannot decode {name} as a JPEG image ({error.message})."
        ) from None
    if tuple(image.shape) != IMAGE_SHAPE:
        raise ValueError(
            f"{path}: {name} is {image.shape[1]}x{image.shape[0]} pixels; "
            "CIFAR-10 images are 32x32."
        )


def _cache_file(source, cache_dir):
    key = f"v{_CACHE_VERSION}:{source.fingerprint()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir) / f"cifar10-{digest}.npz"


def _read_cache(cache_file):
    try:
        with np.load(cache_file) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        # Missing, half-written or foreign files are rebuilt, not trusted.
        return None
    if images.shape[1:] != IMAGE_SHAPE or images.shape[:1] != labels.shape:
        return None
    return images, labels


def _write_cache(cache_file, images, labels):
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a concurrent or
    # interrupted load never sees a partial cache file.
    handle, temp_name = tempfile.mkstemp(
        dir=cache_file.parent, prefix=cache_file.stem, suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(temp_name, cache_file)
    except BaseException:
        os.unlink(temp_name)
        raise


def _split(images, labels, validation_per_class):
    """Holds out the last `validation_per_class` images of each class."""
    train_indices, val_indices = [], []
    for label in range(len(CLASS_NAMES)):
        indices = np.flatnonzero(labels == label)
        cut = len(indices) - validation_per_class
        train_indices.append(indices[:cut])
        val_indices.append(indices[cut:])
    train_indices = np.concatenate(train_indices)
    val_indices = np.concatenate(val_indices)
    return (
        (images[train_indices], labels[train_indices]),
        (images[val_indices], labels[val_indices]),
    )


def _check_validation_per_class(value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 0
    ):
        raise ValueError(
            "`validation_per_class` must be a non-negative integer (or None "
            f"for the default), got {value!r}."
        )


class ValidationSplitError(ValueError):
    """`validation_per_class` holds out every image of a class.

    Its attributes let a caller name its own argument for the count (the
    command line's `--val_per_class`, say).

    Attributes:
        value: the `validation_per_class` asked for.
        images: images of the smallest class.
        class_name: that class.
        path: the data set.
    """

    def __init__(self, value, images, class_name, path):
        self.value = value
        self.images = images
        self.class_name = class_name
        self.path = path
        super().__init__(self.describe("validation_per_class"))

    def describe(self, argument):
        """The message, naming the count `argument`."""
        return (f"{argument}={self.value} leaves no training images: "
                f"{self.path} has {self.images} images of class "
                f"{self.class_name!r}. Pass a value below {self.images}.")


def _check_validation_fits(files_by_class, validation_per_class, path):
    class_name, names = min(
        files_by_class.items(), key=lambda item: len(item[1])
    )
    if validation_per_class >= len(names):
        raise ValidationSplitError(validation_per_class, len(names),
                                   class_name, path)


def _check_examples(x, y):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4:
        raise ValueError(
            "`x` must be a batch of images of shape (num_images, height, "
            f"width, channels), got shape {x.shape}."
        )
    if x.dtype != np.uint8:
        raise ValueError(
            f"`x` must hold uint8 pixel values in [0, 255] (as returned by "
            f"load_cifar10), got dtype {x.dtype}. make_dataset scales the "
            "images itself."
        )
    if y.shape != x.shape[:1]:
        raise ValueError(
            f"`y` must hold one label per image: expected shape "
            f"({len(x)},), got {y.shape}."
        )
    return x, y


def _check_batch_size(batch_size):
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be a positive integer, got {batch_size!r}."
        )


def _augment(dataset, seed):
    """Random 4-pixel-padded crop and horizontal flip, per example."""
    # Stateless ops fed from a seeded random stream: reproducible for a
    # seed, yet different every epoch.
    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True
    ).batch(2)
    return tf.data.Dataset.zip((dataset, seeds)).map(
        _augment_example, num_parallel_calls=tf.data.AUTOTUNE
    )


def _augment_example(example, seed):
    image, label = example
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2)
    )
    size = tf.shape(image)
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(padded, size, seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image, label


def _scale_images(images, labels):
    return tf.cast(images, tf.float32) / 255.0, labels


def _download(validation_per_class):
    """The original data set through Keras, split like the local copies."""
    import keras

    (x, y), _ = keras.datasets.cifar10.load_data()
    y = y.reshape(-1).astype(np.int64)
    per_class = (DEFAULT_VALIDATION_PER_CLASS if validation_per_class is None
                 else validation_per_class)
    val = np.zeros(len(y), bool)
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(y == c)
        val[idx[len(idx) - per_class:]] = True
    return (x[~val], y[~val]), (x[val], y[val])
