"""The examples' data: tensorflow-datasets (failing fast offline) or .npz arrays, the held-out split, preprocessing."""

import dataclasses
import re
from typing import Callable

import numpy as np


class DataError(Exception):
    """Data that cannot be had or read: reported in one line, not a traceback."""


def scale_to_unit(x):
    """Flatten uint8 images to float32 features in [0, 1]."""
    return x.reshape(len(x), -1).astype(np.float32) / 255.0


def standardise_per_channel(x_train, x_test):
    """Flatten colour images, each channel standardised with the training set's mean and deviation."""
    x_train = x_train.astype(np.float32)
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2)) + 1e-6
    return tuple(((x.astype(np.float32) - mean) / std).reshape(len(x), -1) for x in (x_train, x_test))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """What an example needs to know about its images."""

    name: str  # run names and log directories start with it
    tfds_name: str
    image_shape: tuple  # one image, as tensorflow-datasets stores it
    classes: int
    # (x_train, x_test) images -> float32 features [N, prod(image_shape)]; the test set may
    # only be transformed with statistics of the training set.
    features: Callable

    def describe_arrays(self):
        return f"x uint8 [N, {', '.join(map(str, self.image_shape))}], y [N] (labels 0-{self.classes - 1})"


MNIST = Dataset("mnist", "mnist", (28, 28), 10, lambda x_train, x_test: (scale_to_unit(x_train), scale_to_unit(x_test)))
SVHN = Dataset("svhn", "svhn_cropped", (32, 32, 3), 10, standardise_per_channel)


def load(dataset, npz, data_dir, split_seed):
    """((x_train, y_train), (x_test, y_test)) ready for the network: features float32, labels int64."""
    (x_train, y_train), (x_test, y_test) = (
        load_npz(npz, dataset, split_seed) if npz else load_tfds(dataset.tfds_name, data_dir)
    )
    x_train, x_test = dataset.features(x_train, x_test)
    return (x_train, np.asarray(y_train).astype(np.int64)), (x_test, np.asarray(y_test).astype(np.int64))


def load_tfds(name, data_dir):
    """(x_train, y_train), (x_test, y_test) as numpy, failing fast where nothing can be downloaded."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    # tfds retries an unreachable host for minutes; one attempt tells us enough.
    downloader.MAX_RETRIES = 0
    try:
        splits = tfds.load(name, split=["train", "test"], data_dir=data_dir, as_supervised=True)
    except Exception as error:  # tfds raises many kinds (ConnectionError, DatasetNotFoundError, ...)
        raise DataError(
            f"could not load {name!r} with tensorflow-datasets ({type(error).__name__}: {cause(error)}); "
            "pass --data-dir with a prepared copy or --npz with arrays"
        ) from None
    # Batches rather than batch_size=-1, which aborts on datasets of unknown cardinality.
    return tuple(
        tuple(np.concatenate(parts) for parts in zip(*tfds.as_numpy(split.batch(8192))))
        for split in splits
    )


def cause(error):
    """What went wrong, in a few words: the unreachable host of a failed download, else the error's first line."""
    text = str(error)
    host = re.search(r"host='([^']+)'", text)
    if host:
        return f"cannot reach {host.group(1)}; is this machine offline?"
    return text.splitlines()[0] if text else "no message"


def load_npz(path, dataset, split_seed):
    """The arrays of an .npz laid out as tensorflow-datasets stores `dataset`, split by `held_out_quarter`."""
    try:
        with np.load(path) as arrays:
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"--npz {path!r} is not an .npz with arrays x and y ({error})") from None
    if x.shape[1:] != dataset.image_shape or y.shape != (len(x),) or len(x) < 4:
        raise DataError(
            f"--npz {path!r}: expected x [N, {', '.join(map(str, dataset.image_shape))}] and y [N] with N >= 4, "
            f"got x {x.shape} and y {y.shape}"
        )
    if x.dtype != np.uint8:
        raise DataError(f"--npz {path!r}: expected x of dtype uint8 (pixel values 0-255), got {x.dtype}")
    if y.dtype.kind not in "iu":
        raise DataError(f"--npz {path!r}: expected integer labels y, got dtype {y.dtype}")
    outside = y[(y < 0) | (y >= dataset.classes)]
    if len(outside):
        raise DataError(f"--npz {path!r}: expected labels y in 0-{dataset.classes - 1}, got {outside[0]}")
    return held_out_quarter(x, y, split_seed)


def held_out_quarter(x, y, seed):
    """(train, test) with a seeded random quarter of the rows as the test set."""
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[: len(x) // 4], order[len(x) // 4 :]
    return (x[train], y[train]), (x[test], y[test])
