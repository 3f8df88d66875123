r"""Cuts the small CIFAR-10 sample shipped inside keras_chex.

The sample keeps, per class, the first `--train_per_class` and the last
`--val_per_class` images (by sorted file name) of the full data set, with
their original names and JPEG bytes (nothing is re-encoded). Its held-out
images are therefore also held out of the full data set's training split
by `load_cifar10` (which holds out the last 500 per class there).

Usage, from the repository root:

    python -m tools.make_cifar10_sample \
        --source=/work/shared/data/cifar10/train.zip \
        --output=keras_chex/data/cifar10_sample.zip
"""

import zipfile

from absl import app
from absl import flags

from keras_chex.cifar import data as datasets

_SOURCE = flags.DEFINE_string(
    "source",
    None,
    "CIFAR-10 zip archive or folder laid out as train/<class>/<image>.jpg.",
    required=True,
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Path of the sample zip archive to write.", required=True
)
_TRAIN_PER_CLASS = flags.DEFINE_integer(
    "train_per_class",
    400,
    "Images per class taken from the start.",
    lower_bound=1,
)
_VAL_PER_CLASS = flags.DEFINE_integer(
    "val_per_class", 100, "Images per class taken from the end.", lower_bound=0
)

# A fixed timestamp makes the archive byte-identical on every run, so
# regenerating it does not show up as a change in version control.
_TIMESTAMP = (1980, 1, 1, 0, 0, 0)


def sample_names(names, train_per_class, val_per_class):
    """Returns the first `train_per_class` and last `val_per_class` names.

    Args:
        names: Image names of one class, sorted.
        train_per_class: Number of names to take from the start.
        val_per_class: Number of names to take from the end.

    Returns:
        The selected names, in their original order.

    Raises:
        ValueError: If the two parts would overlap.
    """
    if train_per_class + val_per_class > len(names):
        raise ValueError(
            f"--train_per_class={train_per_class} plus --val_per_class="
            f"{val_per_class} exceeds the {len(names)} images of a class."
        )
    tail = names[len(names) - val_per_class :] if val_per_class else []
    return names[:train_per_class] + tail


def write_sample(source, output, train_per_class, val_per_class):
    """Writes the sample of `source` to the zip archive `output`.

    Args:
        source: A source returned by `datasets.open_source`.
        output: Path of the zip archive to write.
        train_per_class: Images per class taken from the start.
        val_per_class: Images per class taken from the end.

    Returns:
        The number of images written.
    """
    # Selected before the output is opened, so that bad flags leave no
    # half-written archive behind.
    selected = [
        sample_names(
            source.files_by_class[class_name], train_per_class, val_per_class
        )
        for class_name in datasets.CLASS_NAMES
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


def main(argv):
    del argv  # Unused.
    source = datasets.open_source(_SOURCE.value)
    count = write_sample(
        source, _OUTPUT.value, _TRAIN_PER_CLASS.value, _VAL_PER_CLASS.value
    )
    print(f"Wrote {count} images to {_OUTPUT.value}.")


if __name__ == "__main__":
    app.run(main)
