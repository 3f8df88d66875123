"""Export to a TensorFlow SavedModel (`model.export`), stripped first."""

import os
import shutil

from keras_chex.deploy import export


def export_saved_model(model, directory, *, overwrite=False):
    """Writes a TensorFlow SavedModel with a `serve` endpoint.

    A keras-chex pruning model is stripped to plain Keras layers first. The
    artifact is written with `model.export(directory, format="tf_saved_model")`
    and needs no Keras or keras-chex code to load.

    Args:
        model: A built `keras.Model`, plain or a keras-chex pruning model.
        directory: Destination directory (str or path-like).
        overwrite: Whether to replace an existing SavedModel at `directory`.
            Only a directory holding a `saved_model.pb` is ever deleted.

    Returns:
        The directory path as a string.

    Raises:
        TypeError: `model` is not a Keras model.
        FileExistsError: `directory` exists, is not empty and `overwrite` is
            False, or it is not a SavedModel directory.

    Example:

    ```python
    path = export_saved_model(model, "export/my_model")
    reloaded = tf.saved_model.load(path)
    y = reloaded.serve(x)
    ```
    """
    directory = os.fspath(directory)
    model, _ = export.strip_if_wrapped(export._check_model(model))
    # Cleared only now, so a failure above leaves an old export in place.
    _check_directory_destination(directory, overwrite)
    with export.quiet_tensorflow_info():
        model.export(directory, format="tf_saved_model", verbose=False)
    return directory


def _check_directory_destination(directory, overwrite):
    """Clears or rejects an existing `directory`."""
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(
            f"{directory!r} exists and is not a directory; choose another "
            "path for the SavedModel."
        )
    if not os.listdir(directory):
        return
    if not overwrite:
        raise FileExistsError(
            f"{directory!r} already exists and is not empty. Pass "
            "`overwrite=True` to replace the SavedModel in it, or choose "
            "another directory."
        )
    # Deleting a whole tree on the user's behalf is only safe when it is
    # clearly a previous export.
    if not os.path.exists(os.path.join(directory, "saved_model.pb")):
        raise FileExistsError(
            f"{directory!r} is not empty and holds no saved_model.pb, so it is "
            "not replaced even with `overwrite=True`. Choose another "
            "directory."
        )
    shutil.rmtree(directory)
