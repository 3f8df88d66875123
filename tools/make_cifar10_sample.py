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


def main(argv):
    del argv  # Unused.
    source = datasets.open_source(_SOURCE.value)
    try:
        count = datasets.write_sample(source, _OUTPUT.value,
                                      _TRAIN_PER_CLASS.value,
                                      _VAL_PER_CLASS.value)
    except ValueError as error:  # It names the arguments: these flags.
        raise app.UsageError(str(error)) from None
    print(f"Wrote {count} images to {_OUTPUT.value}.")


if __name__ == "__main__":
    app.run(main)
