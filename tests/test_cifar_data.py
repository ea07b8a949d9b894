"""CIFAR-10 loader on small batch files written in the real format (no CIFAR-10 data exists on this machine)."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from unroll_examples import cifar_data as cd


def write_batch(path: Path, n: int, seed: int) -> tuple:
    """A batch as the official files hold it: a pickled dict with bytes keys, b'data' uint8 [N, 3072] (R plane,
    G plane, B plane) and b'labels' a list of ints."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    entry = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
             b"filenames": [b"img_%d.png" % i for i in range(n)]}
    path.write_bytes(pickle.dumps(entry, protocol=2))
    return data, labels


def write_split(folder: Path, split: str, n: int = 6) -> Dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(cd.CIFAR10_FILES[split]):
        write_batch(folder / name, n, seed=i)
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in cd.CIFAR10_FILES[split]}


def test_loads_the_real_format_in_channel_plane_order(tmp_path: Path) -> None:
    data, labels = write_batch(tmp_path / "test_batch", 4, seed=0)
    sums = {"test_batch": hashlib.md5((tmp_path / "test_batch").read_bytes()).hexdigest()}
    split = cd.load_cifar10("test", tmp_path, download=False, checksums=sums)
    assert split.split == "test" and split.images.shape == (4, 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == labels
    # Byte 1024 * c + 32 * row + col is channel c, pixel (row, col).
    assert int(split.images[2, 1, 5, 7]) == int(data[2, 1024 + 32 * 5 + 7])
    assert split.description == "CIFAR-10 test split (4 images)"


def test_train_split_concatenates_five_batches_in_the_subfolder(tmp_path: Path) -> None:
    sums = write_split(tmp_path / cd.CIFAR10_SUBDIR, "train", n=3)
    split = cd.load_cifar10("train", tmp_path, download=False, checksums=sums)  # finds cifar-10-batches-py/
    assert len(split) == 15 and split.folder == tmp_path / cd.CIFAR10_SUBDIR


def test_official_checksum_mismatch_names_the_batch(tmp_path: Path) -> None:
    write_split(tmp_path, "test")
    with pytest.raises(cd.DatasetError, match=f"test_batch: md5 is .*, expected {cd.CIFAR10_MD5['test_batch']}"):
        cd.load_cifar10("test", tmp_path, download=False)


def test_truncated_batch_is_a_format_error(tmp_path: Path) -> None:
    write_batch(tmp_path / "test_batch", 4, seed=0)
    (tmp_path / "test_batch").write_bytes((tmp_path / "test_batch").read_bytes()[:5000])
    with pytest.raises(cd.FormatError, match="test_batch: not a complete CIFAR-10 python batch"):
        cd.load_cifar10("test", tmp_path, download=False, checksums=None)


def test_wrong_shape_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(cd.FormatError, match=r"test_batch: b'data' must be uint8 \[N, 3072\]"):
        cd.load_cifar10("test", tmp_path, download=False, checksums=None)


def test_missing_batches_say_which_files_go_where(tmp_path: Path) -> None:
    with pytest.raises(cd.MissingDataError) as info:
        cd.load_cifar10("train", tmp_path, download=False)
    message = str(info.value)
    assert "data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5" in message
    assert str(tmp_path) in message and "cifar-10-python.tar.gz" in message and cd.CIFAR10_ENV_VAR in message


def test_download_unpacks_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    sums = write_split(source / cd.CIFAR10_SUBDIR, "test", n=5)
    archive = tmp_path / "mirror" / cd.CIFAR10_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:  # the official archive's layout: cifar-10-batches-py/<batch>
        tar.add(source / cd.CIFAR10_SUBDIR, arcname=cd.CIFAR10_SUBDIR)
    monkeypatch.setattr(cd, "CIFAR10_URL", archive.parent.as_uri() + "/")
    monkeypatch.setattr(cd, "CIFAR10_ARCHIVE_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    split = cd.load_cifar10("test", tmp_path / "target", download=True, checksums=sums)
    assert len(split) == 5 and (tmp_path / "target" / "test_batch").is_file()


def test_unpickling_non_dicts_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    pickle.dump([1, 2, 3], buffer)
    (tmp_path / "test_batch").write_bytes(buffer.getvalue())
    with pytest.raises(cd.FormatError, match="expected a dict with b'data' and b'labels', got list"):
        cd.load_cifar10("test", tmp_path, download=False, checksums=None)
