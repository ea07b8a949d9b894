"""CIFAR-10 from the standard python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``).

The folder is ``root`` if given, else ``$UNROLL_CIFAR10_DIR``, else ``../shared/data/cifar10`` next to the
repository when it exists, else ``<repo>/data/cifar10``. The batch files may sit in that folder or in its
``cifar-10-batches-py/`` subfolder. When they are absent and downloading is allowed, the official
``cifar-10-python.tar.gz`` is fetched (md5-checked) and unpacked there; otherwise the error says which files to
put where. Every batch is checked against its official md5 *before* it is unpickled.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .mnist_data import (
    DatasetError,
    FormatError,
    LabelledImages,
    MissingDataError,
    PathLike,
    default_folder,
    download_file,
    ensure_files,
)

CIFAR10_ENV_VAR = "UNROLL_CIFAR10_DIR"
CIFAR10_SUBDIR = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR10_FILES: Dict[str, Tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
# Official md5s (https://www.cs.toronto.edu/~kriz/cifar.html for the archive; the batch values are those
# torchvision checks).
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_MD5: Dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_BYTES = 3 * 32 * 32


class CIFAR10(LabelledImages):
    """One CIFAR-10 split: ``images`` uint8 [N, 3, 32, 32] (RGB), ``labels`` int64 [N]."""

    NAME, ITEMS = "CIFAR-10", "images"


def cifar10_folder(root: Optional[PathLike] = None) -> Path:
    """The folder holding the batch files: ``<folder>/cifar-10-batches-py`` if that exists, else ``<folder>``."""
    folder = default_folder(CIFAR10_ENV_VAR, "cifar10", root)
    return folder / CIFAR10_SUBDIR if (folder / CIFAR10_SUBDIR).is_dir() else folder


def read_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> ``(uint8 [N, 3, 32, 32], int64 [N])``; format problems raise :class:`FormatError`."""
    try:
        with open(path, "rb") as handle:
            # The batches were pickled by Python 2: keys and strings come back as bytes with encoding="bytes".
            entry = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise FormatError(f"{path}: not a complete CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict) or b"data" not in entry or b"labels" not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise FormatError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(entry[b"data"])
    labels = np.asarray(entry[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise FormatError(f"{path}: b'data' must be uint8 [N, {IMAGE_BYTES}], got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(f"{path}: b'labels' must hold {data.shape[0]} integers, got {labels.dtype} "
                          f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise FormatError(f"{path}: labels must be 0-9, found range [{labels.min()}, {labels.max()}]")
    # Rows are 1024 R, then 1024 G, then 1024 B values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _fetch_archive(folder: Path, missing: Sequence[str]) -> Optional[str]:
    """Fetcher for :func:`ensure_files`: download the official archive into ``folder`` and unpack its batch
    files directly into ``folder`` (without the archive's ``cifar-10-batches-py/`` prefix)."""
    archive = folder / CIFAR10_ARCHIVE
    if not archive.is_file():
        reason = download_file([CIFAR10_URL + CIFAR10_ARCHIVE], archive, CIFAR10_ARCHIVE_MD5)
        if reason is not None:
            return reason
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).name in missing]
            for member in members:
                member.name = Path(member.name).name
            # The "data" filter refuses absolute paths and links out of the target folder.
            tar.extractall(folder, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"{archive}: cannot unpack ({exc}); delete it and download it again") from exc
    return None


def load_cifar10(split: str = "train", root: Optional[PathLike] = None, *, download: bool = True,
                 checksums: Optional[Mapping[str, str]] = CIFAR10_MD5) -> CIFAR10:
    """Load CIFAR-10 ``split`` (``"train"``: the five data batches, 50,000 images; ``"test"``: 10,000).

    ``checksums`` maps batch names to md5s (official by default; ``None`` skips the check). Errors name the file.
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = cifar10_folder(root)
    names = CIFAR10_FILES[split]
    ensure_files(folder, names, checksums, _fetch_archive if download else None,
                 f"{CIFAR10_URL}{CIFAR10_ARCHIVE}, unpacked", f"CIFAR-10 {split} split", CIFAR10_ENV_VAR)
    batches = [read_batch(folder / name) for name in names]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return CIFAR10(images=torch.from_numpy(images), labels=torch.from_numpy(labels), split=split, folder=folder)


__all__ = ["CIFAR10", "CIFAR10_CLASSES", "CIFAR10_MD5", "DatasetError", "MissingDataError", "cifar10_folder",
           "load_cifar10", "read_batch"]
