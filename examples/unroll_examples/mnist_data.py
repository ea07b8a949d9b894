"""MNIST from the standard IDX ``.gz`` files, and the MNIST-derived datasets of Metz et al. (2017).

* :func:`load_mnist` reads the four official files from a folder, checks their official md5 checksums, parses
  the IDX format with numpy and says which split it loaded (results made from the test split must say so).
  Missing files are downloaded from a public mirror when the network allows; otherwise it stops with a message
  naming the files and the folder to put them in.
* :class:`StackedMNIST` (App. E): three random digits as the R, G, B channels; label ``100*d1 + 10*d2 + d3``.
* :func:`colorize` / :class:`ColoredMNIST` (App. F): ``I*C + (I - 1)`` with ``C ~ N(0, 0.5^2)`` per channel,
  plus ``N(0, 0.2^2)`` pixel noise, clipped to ``[-1, 1]``.

The folder is ``root`` if given, else ``$UNROLL_MNIST_DIR``, else ``../shared/data/mnist`` next to the
repository when it exists, else ``<repo>/data/mnist``.

Shared download/checksum helpers used by :mod:`cifar_data` live here as well.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import REPO_ROOT  # re-exported: the tests read md.REPO_ROOT

PathLike = Union[str, os.PathLike]

MNIST_ENV_VAR = "UNROLL_MNIST_DIR"
MNIST_SPLITS = ("train", "test")

MNIST_FILES: Dict[str, Tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST_MD5: Dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_COUNTS = {"train": 60_000, "test": 10_000}
# yann.lecun.com often refuses downloads; the S3 copy is the one torchvision uses first.
MNIST_MIRRORS: Tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 10.0

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ----------------------------------------------------------------------------------------------- errors


class DatasetError(RuntimeError):
    """Base class for every data-file problem; the message always names the file or folder."""


class MissingDataError(DatasetError, FileNotFoundError):
    """Files are absent and could not be downloaded."""


class ChecksumError(DatasetError):
    """A file's md5 differs from the official one (corrupt, truncated or a different file)."""


class FormatError(DatasetError):
    """A file is not in the expected format (bad magic number, truncated payload, wrong shape)."""


# ----------------------------------------------------------------------------------- shared file helpers


def md5sum(path: PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, expected: Optional[str]) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its md5 is ``expected`` (``None`` skips the check)."""
    if expected is None:
        return
    actual = md5sum(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"{path}: md5 is {actual}, expected {expected} ({path.stat().st_size} bytes). The file is corrupt, "
            f"truncated or not the official one; delete it and download it again.")


def download_file(urls: Sequence[str], dest: Path, md5: Optional[str],
                  timeout: float = DOWNLOAD_TIMEOUT_S) -> Optional[str]:
    """Fetch the first of ``urls`` that works into ``dest`` (checked against ``md5`` before it is renamed into
    place, so a failed download never leaves a bad file behind). Returns ``None`` on success, else a one-line
    reason that callers put in their error message."""
    reasons = []
    partial = dest.with_name(dest.name + ".part")
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                dest.parent.mkdir(parents=True, exist_ok=True)  # only once a server answered
                with open(partial, "wb") as out:
                    shutil.copyfileobj(response, out)
            verify_md5(partial, md5)
        except (urllib.error.URLError, OSError, ChecksumError) as exc:
            reasons.append(f"{url}: {exc}")
            partial.unlink(missing_ok=True)
            continue
        partial.replace(dest)
        return None
    return "; ".join(reasons)


Fetcher = Callable[[Path, Sequence[str]], Optional[str]]
"""``fetch(folder, missing_names)``: try to put the files there; returns ``None`` or a reason it failed."""


def ensure_files(folder: Path, names: Sequence[str], checksums: Optional[Mapping[str, str]],
                 fetch: Optional[Fetcher], source: str, what: str, env_var: str) -> None:
    """Make every file of ``names`` present in ``folder`` (calling ``fetch`` for the missing ones when it is
    given) and check each md5; errors name the files, the folder and ``source`` (where to get them).

    Only missing files are fetched: a present file with the wrong checksum is an error, never silently
    replaced, so a user's file is not overwritten behind their back.
    """
    missing = [name for name in names if not (folder / name).is_file()]
    reason = fetch(folder, missing) if missing and fetch is not None else None
    still_missing = [name for name in names if not (folder / name).is_file()]
    if still_missing:
        why = "downloading was disabled" if fetch is None else f"the download failed: {reason}"
        raise MissingDataError(
            f"{what}: missing {', '.join(still_missing)} in {folder} ({why}). Put the standard files "
            f"{', '.join(still_missing)} in {folder} (from {source}), or point ${env_var} (or the scripts' "
            f"--data-dir) at a folder that holds them.")
    for name in names:
        verify_md5(folder / name, None if checksums is None else checksums.get(name))


def default_folder(env_var: str, shared_name: str, root: Optional[PathLike] = None) -> Path:
    """``root``, else ``$env_var``, else ``<repo>/../shared/data/<shared_name>`` if present, else
    ``<repo>/data/<shared_name>`` (where downloads go)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(env_var):
        return Path(os.environ[env_var]).expanduser()
    shared = REPO_ROOT.parent / "shared" / "data" / shared_name
    if shared.is_dir():
        return shared
    return REPO_ROOT / "data" / shared_name


# ------------------------------------------------------------------------------------------------ IDX


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode an (uncompressed) IDX byte string into a native-endian numpy array; errors name ``name``."""
    if len(raw) < 4:
        raise FormatError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    zero1, zero2, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise FormatError(f"{name}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type TT in "
                          f"{{{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}}} and NN >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FormatError(f"{name}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        kind = "truncated" if payload < expected else "has trailing bytes"
        raise FormatError(f"{name}: IDX payload {kind}: {payload} bytes for dims {dims} of {dtype.name} "
                          f"(expected {expected})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_gz(path: PathLike) -> np.ndarray:
    """Read a gzip-compressed IDX file; a truncated or non-gzip file raises :class:`FormatError` naming it."""
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise FormatError(f"{path}: not a complete gzip file ({exc})") from exc
    return parse_idx(raw, str(path))


# ---------------------------------------------------------------------------------------------- MNIST


@dataclass(frozen=True)
class LabelledImages:
    """One split of a labelled image dataset: ``images`` uint8 [N, ...], ``labels`` int64 [N], and where they
    came from. Subclasses name the dataset (``NAME``) and what an item is (``ITEMS``)."""

    images: Tensor
    labels: Tensor
    split: str
    folder: Path
    NAME: ClassVar[str] = "images"
    ITEMS: ClassVar[str] = "images"

    @property
    def description(self) -> str:
        """A phrase for results, e.g. ``"MNIST test split (10,000 digits)"``."""
        return f"{self.NAME} {self.split} split ({len(self.labels):,} {self.ITEMS})"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class MNIST(LabelledImages):
    """One MNIST split: ``images`` uint8 [N, 28, 28] (0 = background), ``labels`` int64 [N]."""

    NAME, ITEMS = "MNIST", "digits"


def mnist_folder(root: Optional[PathLike] = None) -> Path:
    """The folder :func:`load_mnist` uses (see the module docstring for the order)."""
    return default_folder(MNIST_ENV_VAR, "mnist", root)


def has_split(split: str = "test", root: Optional[PathLike] = None) -> bool:
    """Whether :func:`mnist_folder` holds both files of ``split`` (nothing is downloaded or checked)."""
    folder = mnist_folder(root)
    return all((folder / name).is_file() for name in MNIST_FILES[split])


def how_to_get(split: str = "test") -> str:
    """What to do when ``split``'s files are missing (for messages and skipped tests)."""
    return (f"the MNIST {split} split ({' and '.join(MNIST_FILES[split])}) is not in {mnist_folder()}: download "
            f"both files from {MNIST_MIRRORS[0]} into {REPO_ROOT / 'data' / 'mnist'} (the experiment scripts do "
            f"so themselves when the network allows), or set ${MNIST_ENV_VAR} to a folder that holds them")


def load_mnist(split: str = "test", root: Optional[PathLike] = None, *, download: bool = True,
               checksums: Optional[Mapping[str, str]] = MNIST_MD5) -> MNIST:
    """Load MNIST ``split`` (``"train"``, ``"test"``, or ``"auto"``: train when its files are present or can be
    downloaded, otherwise test) from ``root``.

    ``checksums`` maps file names to md5s (the official ones by default; ``None`` skips verification, e.g. for
    a user's own conversion). Raises :class:`MissingDataError`, :class:`ChecksumError` or :class:`FormatError`
    with the file's path in the message.
    """
    folder = mnist_folder(root)
    if split == "auto":
        try:
            return load_mnist("train", folder, download=download, checksums=checksums)
        except MissingDataError:
            return load_mnist("test", folder, download=download, checksums=checksums)
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train', 'test' or 'auto', got {split!r}")
    image_name, label_name = MNIST_FILES[split]

    def fetch(target: Path, missing: Sequence[str]) -> Optional[str]:
        failures = []
        for name in missing:
            md5 = None if checksums is None else checksums.get(name)
            reason = download_file([mirror + name for mirror in MNIST_MIRRORS], target / name, md5)
            if reason is not None:
                failures.append(f"{name}: {reason}")
        return " | ".join(failures) or None

    ensure_files(folder, (image_name, label_name), checksums, fetch if download else None, MNIST_MIRRORS[0],
                 f"MNIST {split} split", MNIST_ENV_VAR)
    images = read_idx_gz(folder / image_name)
    labels = read_idx_gz(folder / label_name)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise FormatError(f"{folder / image_name}: expected uint8 images [N, rows, cols], got {images.dtype} "
                          f"{images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise FormatError(f"{folder / label_name}: expected {images.shape[0]} labels, got shape {labels.shape}")
    if labels.size and labels.max() > 9:
        raise FormatError(f"{folder / label_name}: labels must be digits 0-9, found {int(labels.max())}")
    return MNIST(images=torch.from_numpy(images), labels=torch.from_numpy(labels.astype(np.int64)),
                 split=split, folder=folder)


# --------------------------------------------------------------------------------------- preprocessing


def pad_digits(images: Tensor, size: int = 32) -> Tensor:
    """Zero-pad (background) [..., 28, 28] digits to [..., size, size], centred; the App. D-F generators
    emit 32x32 images (4 -> 8 -> 16 -> 32)."""
    height, width = images.shape[-2:]
    if size < max(height, width):
        raise ValueError(f"cannot pad {height}x{width} images down to {size}")
    top, left = (size - height) // 2, (size - width) // 2
    return torch.nn.functional.pad(images, (left, size - width - left, top, size - height - top))


def to_unit(images: Tensor) -> Tensor:
    """uint8 -> float in [0, 1] (App. F: "the mnist digit, I, scaled between 0 and 1")."""
    return images.float() / 255.0


def to_symmetric(images: Tensor) -> Tensor:
    """uint8 -> float in [-1, 1): App. C scales MNIST "to [-1, 1)", i.e. ``x / 128 - 1``."""
    return images.float() / 128.0 - 1.0


# ---------------------------------------------------------------------------------- Stacked MNIST (App. E)


def stacked_label(digits: Tensor) -> Tensor:
    """[..., 3] digits (R, G, B) -> the 1000-way mode label ``100*d1 + 10*d2 + d3``."""
    return digits[..., 0] * 100 + digits[..., 1] * 10 + digits[..., 2]


class StackedMNIST:
    """Three independently drawn MNIST digits stacked as R, G, B: 1000 modes (App. E).

    ``sample`` draws a fresh batch of index triples each call, so the dataset is effectively the
    ``N^3`` possible stacks rather than a fixed subset.
    """

    def __init__(self, mnist: MNIST, size: int = 32) -> None:
        self.digits = to_symmetric(pad_digits(mnist.images, size))  # [N, S, S], background -1
        self.labels = mnist.labels
        self.source = mnist.description

    def sample(self, n: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """``(images [n, 3, S, S] in [-1, 1), mode labels [n] in 0..999)``."""
        idx = torch.randint(len(self.labels), (n, 3), generator=generator)
        return self.digits[idx], stacked_label(self.labels[idx])


# ---------------------------------------------------------------------------------- colored MNIST (App. F)

COLOR_STD = 0.5
PIXEL_NOISE_STD = 0.2


def colorize(digits: Tensor, colors: Tensor, noise: Optional[Tensor] = None) -> Tensor:
    """App. F: ``clip(I * C + (I - 1) + noise, -1, 1)`` per channel.

    ``digits`` [N, H, W] in [0, 1] (I), ``colors`` [N, 3] (C), ``noise`` [N, 3, H, W] or ``None``. Background
    (I = 0) maps to -1 and a full-intensity stroke (I = 1) to the colour C itself, so the foreground colour of
    an image is C (clipped to [-1, 1]).
    """
    intensity = digits.unsqueeze(1)  # [N, 1, H, W]
    image = intensity * colors[:, :, None, None] + (intensity - 1.0)
    if noise is not None:
        image = image + noise
    return image.clamp(-1.0, 1.0)


class ColoredMNIST:
    """MNIST digits in a random colour ``C ~ N(0, color_std^2 I_3)`` with ``N(0, noise_std^2)`` pixel noise."""

    def __init__(self, mnist: MNIST, size: int = 32, color_std: float = COLOR_STD,
                 noise_std: float = PIXEL_NOISE_STD) -> None:
        self.digits = to_unit(pad_digits(mnist.images, size))
        self.color_std = color_std
        self.noise_std = noise_std
        self.source = mnist.description

    def sample(self, n: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
        """``(images [n, 3, S, S] in [-1, 1], true colours C [n, 3])``."""
        idx = torch.randint(self.digits.shape[0], (n,), generator=generator)
        digits = self.digits[idx]
        colors = self.color_std * torch.randn(n, 3, generator=generator)
        noise = self.noise_std * torch.randn(n, 3, *digits.shape[-2:], generator=generator)
        return colorize(digits, colors, noise), colors
