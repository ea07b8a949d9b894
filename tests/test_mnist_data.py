"""MNIST loader (IDX parsing, checksums, clear errors, download path), Stacked and colored MNIST (App. E, F)."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from unroll_examples import mnist_data as md

REAL_DIR = md.mnist_folder()  # $UNROLL_MNIST_DIR, else ../shared/data/mnist beside the repository, else data/mnist
REAL_TEST_FILES = md.MNIST_FILES["test"]
needs_real_mnist = pytest.mark.skipif(not md.has_split("test"), reason=md.how_to_get("test"))


def write_idx_gz(path: Path, array: np.ndarray) -> str:
    """Write ``array`` (uint8 or int32) as a gzip IDX file; returns its md5."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(array.dtype.newbyteorder(">")).tobytes()))
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fake_split(folder: Path, split: str = "test", n: int = 20, seed: int = 0) -> Dict[str, str]:
    """Small IDX files under the official names; returns their md5s (to pass as ``checksums``)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    image_name, label_name = md.MNIST_FILES[split]
    folder.mkdir(parents=True, exist_ok=True)
    return {image_name: write_idx_gz(folder / image_name, images),
            label_name: write_idx_gz(folder / label_name, labels)}


# ------------------------------------------------------------------------------------------------ IDX


def test_parse_idx_round_trips_uint8_and_int32(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([-5, 0, 70000], dtype=np.int32)
    write_idx_gz(tmp_path / "a.gz", images)
    write_idx_gz(tmp_path / "b.gz", ints)
    np.testing.assert_array_equal(md.read_idx_gz(tmp_path / "a.gz"), images)
    np.testing.assert_array_equal(md.read_idx_gz(tmp_path / "b.gz"), ints)


def test_bad_magic_is_a_format_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\x00\x00\x00\x01" + b"\x05"))
    with pytest.raises(md.FormatError, match=r"bad\.gz: bad IDX magic number 0x12340801"):
        md.read_idx_gz(path)


def test_truncated_payload_and_truncated_gzip_are_format_errors(tmp_path: Path) -> None:
    raw = bytes([0, 0, 0x08, 2]) + np.array([3, 3], dtype=">u4").tobytes() + bytes(8)  # 9 pixels expected
    with pytest.raises(md.FormatError, match="short.idx: IDX payload truncated: 8 bytes"):
        md.parse_idx(raw, "short.idx")
    full = tmp_path / "full.gz"
    write_idx_gz(full, np.zeros((50, 28, 28), dtype=np.uint8))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full.read_bytes()[:40])
    with pytest.raises(md.FormatError, match="cut.gz: not a complete gzip file"):
        md.read_idx_gz(cut)


# -------------------------------------------------------------------------------------- loading a folder


def test_load_mnist_from_a_folder_of_constructed_files(tmp_path: Path) -> None:
    sums = write_fake_split(tmp_path, "test", n=20)
    data = md.load_mnist("test", tmp_path, download=False, checksums=sums)
    assert data.split == "test" and len(data) == 20
    assert data.images.dtype == torch.uint8 and data.images.shape == (20, 28, 28)
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [i % 10 for i in range(20)]
    assert data.description == "MNIST test split (20 digits)"


def test_wrong_checksum_names_the_file(tmp_path: Path) -> None:
    sums = write_fake_split(tmp_path, "test")
    sums["t10k-labels-idx1-ubyte.gz"] = "0" * 32
    with pytest.raises(md.ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz: md5 is [0-9a-f]{32}, expected 0{32}"):
        md.load_mnist("test", tmp_path, download=False, checksums=sums)


def test_official_checksums_reject_constructed_files(tmp_path: Path) -> None:
    write_fake_split(tmp_path, "test")
    with pytest.raises(md.ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        md.load_mnist("test", tmp_path, download=False)


def test_missing_files_say_which_files_go_where(tmp_path: Path) -> None:
    with pytest.raises(md.MissingDataError) as info:
        md.load_mnist("train", tmp_path, download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in message
    assert f"in {tmp_path}" in message and "downloading was disabled" in message and md.MNIST_ENV_VAR in message


def test_download_fetches_missing_files_and_verifies_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror, target = tmp_path / "mirror", tmp_path / "target"
    sums = write_fake_split(mirror, "test", n=10)
    # A file:// mirror exercises the urllib path without a network.
    monkeypatch.setattr(md, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    data = md.load_mnist("test", target, download=True, checksums=sums)
    assert len(data) == 10 and sorted(p.name for p in target.iterdir()) == sorted(sums)


def test_failed_download_leaves_no_file_and_reports_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror, target = tmp_path / "mirror", tmp_path / "target"
    sums = write_fake_split(mirror, "test")
    sums["t10k-images-idx3-ubyte.gz"] = "f" * 32  # the mirror serves a file with another checksum
    monkeypatch.setattr(md, "MNIST_MIRRORS", (mirror.as_uri() + "/",))
    with pytest.raises(md.MissingDataError, match="the download failed: t10k-images-idx3-ubyte.gz: .*md5 is"):
        md.load_mnist("test", target, download=True, checksums=sums)
    assert not (target / "t10k-images-idx3-ubyte.gz").exists()
    assert not list(target.glob("*.part"))


def test_auto_falls_back_to_the_test_split(tmp_path: Path) -> None:
    sums = write_fake_split(tmp_path, "test")
    assert md.load_mnist("auto", tmp_path, download=False, checksums=sums).split == "test"
    sums.update(write_fake_split(tmp_path, "train", n=30))
    assert md.load_mnist("auto", tmp_path, download=False, checksums=sums).split == "train"


def test_folder_resolution_prefers_argument_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(md.MNIST_ENV_VAR, str(tmp_path / "env"))
    assert md.mnist_folder(tmp_path / "arg") == tmp_path / "arg"
    assert md.mnist_folder() == tmp_path / "env"
    monkeypatch.delenv(md.MNIST_ENV_VAR)
    assert md.mnist_folder() in (md.REPO_ROOT.parent / "shared" / "data" / "mnist", md.REPO_ROOT / "data" / "mnist")


@needs_real_mnist
def test_real_test_split_loads_with_official_checksums() -> None:
    data = md.load_mnist("test", REAL_DIR, download=False)
    assert data.split == "test" and data.images.shape == (10_000, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first t10k digits
    # Published per-class counts of the MNIST test set.
    assert torch.bincount(data.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_real_mnist
def test_truncated_copy_of_the_real_file_fails_its_checksum(tmp_path: Path) -> None:
    for name in REAL_TEST_FILES:
        shutil.copy(REAL_DIR / name, tmp_path / name)
    images = tmp_path / REAL_TEST_FILES[0]
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(md.ChecksumError, match=f"{images}: md5 is .* \\(100000 bytes\\)"):
        md.load_mnist("test", tmp_path, download=False)
    # Without the checksum the parser still refuses the truncated file.
    with pytest.raises(md.FormatError, match=REAL_TEST_FILES[0]):
        md.load_mnist("test", tmp_path, download=False, checksums=None)


# ---------------------------------------------------------------------------------------- preprocessing


def test_padding_and_scaling() -> None:
    digits = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    padded = md.pad_digits(digits)
    assert padded.shape == (2, 32, 32) and int(padded.sum()) == 2 * 28 * 28 * 255
    assert padded[:, :2].sum() == 0 and padded[:, -2:].sum() == 0 and padded[:, :, :2].sum() == 0
    scaled = md.to_symmetric(torch.tensor([0, 128, 255], dtype=torch.uint8))
    assert scaled.tolist() == [-1.0, 0.0, 127 / 128]  # App. C: [-1, 1)
    assert md.to_unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------- Stacked MNIST


def constant_digits(n_per_class: int = 3) -> md.MNIST:
    """Digit ``d`` is an image filled with ``20 * d + 10``, so a channel's value reveals its class."""
    labels = torch.arange(10).repeat(n_per_class)
    images = (20 * labels + 10).to(torch.uint8)[:, None, None].expand(-1, 28, 28).contiguous()
    return md.MNIST(images=images, labels=labels, split="test", folder=Path("."))


def test_stacked_mnist_labels_match_channel_contents() -> None:
    stacked = md.StackedMNIST(constant_digits(), size=32)
    images, labels = stacked.sample(500, torch.Generator().manual_seed(0))
    assert images.shape == (500, 3, 32, 32) and labels.shape == (500,)
    centre = images[:, :, 16, 16]  # inside the 28x28 digit, away from the padding
    digits = torch.round(((centre + 1) * 128 - 10) / 20).long()
    assert torch.equal(labels, 100 * digits[:, 0] + 10 * digits[:, 1] + digits[:, 2])
    assert (images[:, :, 0, :] == -1).all()  # padding is background
    assert len(labels.unique()) > 350  # 500 draws from 1000 equally likely modes cover ~400


def test_stacked_label_arithmetic() -> None:
    assert md.stacked_label(torch.tensor([[1, 2, 3], [9, 9, 9], [0, 0, 7]])).tolist() == [123, 999, 7]


# ---------------------------------------------------------------------------------------- colored MNIST


def test_colorize_formula_on_constructed_pixels() -> None:
    digits = torch.tensor([[[0.0, 0.5, 1.0]]])  # I = 0, 0.5, 1 in one row
    colors = torch.tensor([[0.4, -0.2, 1.6]])
    out = md.colorize(digits, colors)
    # I*C + (I - 1): background -1, half intensity 0.5*C - 0.5, full intensity C (clipped to 1).
    expected = torch.tensor([[-1.0, -0.3, 0.4], [-1.0, -0.6, -0.2], [-1.0, 0.3, 1.0]])
    torch.testing.assert_close(out[0, :, 0], expected)
    noise = torch.full((1, 3, 1, 3), 0.1)
    torch.testing.assert_close(md.colorize(digits, colors, noise)[0, :, 0], (expected + 0.1).clamp(-1, 1))


def test_colored_mnist_draws_colours_and_noise_at_the_paper_scales() -> None:
    colored = md.ColoredMNIST(constant_digits(), size=32)
    colored.digits = torch.zeros_like(colored.digits)  # all background: only the noise remains
    images, colors = colored.sample(400, torch.Generator().manual_seed(0))
    assert images.shape == (400, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert abs(float(colors.std()) - md.COLOR_STD) < 0.03
    deviation = images + 1  # -1 + N(0, 0.2^2) clipped at -1: half the pixels sit exactly at -1
    assert abs(float((deviation == 0).float().mean()) - 0.5) < 0.01
    half_normal_mean = md.PIXEL_NOISE_STD * (2 / np.pi) ** 0.5
    assert abs(float(deviation[deviation > 0].mean()) - half_normal_mean) < 0.005
