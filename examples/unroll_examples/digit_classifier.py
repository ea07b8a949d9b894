"""The MNIST digit classifier that labels the three channels of Stacked MNIST samples (Sec. 3.3.1, Table 1).

Only the 10,000-digit test split is available on these machines, so by default the classifier trains on 8,000
digits of the *test split* and reports its accuracy on the other 2,000 (a seeded permutation). It takes
32x32 inputs in [-1, 1] (the App. E generator's output; 28x28 digits are padded with background) and is
cached to ``$UNROLL_CACHE_DIR/mnist_classifier.pt`` (default ``<repo>/runs/cache/``) together with its
configuration, a fingerprint of the digits it saw and its held-out accuracy; a cache whose configuration or
data differ is retrained. ``examples/gan/mnist_classifier.py`` trains it from the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import runs
from .mnist_data import MNIST, REPO_ROOT, PathLike, load_mnist, pad_digits, stacked_label, to_symmetric

CACHE_ENV_VAR = "UNROLL_CACHE_DIR"
CACHE_NAME = "mnist_classifier.pt"
IMAGE_SIZE = 32
TARGET_ACCURACY = 0.985


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that determines the trained weights (stored in the cache and compared on load)."""

    split: str = "test"  # the MNIST split the digits come from
    n_train: int = 8000
    n_holdout: int = 2000
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment: bool = True  # small random rotations / scalings / shifts: 8,000 digits are few for a CNN
    width: int = 32  # channels of the first conv; the second has twice as many
    seed: int = 0


class DigitCNN(nn.Module):
    """Two 5x5 conv + max-pool blocks and a 2-layer head; ~0.5M parameters, ~6M MACs per 32x32 digit."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 5), nn.ReLU(), nn.MaxPool2d(2),            # 32 -> 28 -> 14
            nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2),    # 14 -> 10 -> 5
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * width * 25, 256), nn.ReLU(),
                                  nn.Dropout(0.3), nn.Linear(256, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(prepare(x)))


def prepare(images: Tensor) -> Tensor:
    """[N, H, W] or [N, 1, H, W] images in [-1, 1] -> [N, 1, 32, 32], padding smaller images with -1."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected [N, H, W] or [N, 1, H, W] digits, got shape {tuple(images.shape)}")
    if images.shape[-1] != IMAGE_SIZE or images.shape[-2] != IMAGE_SIZE:
        images = pad_digits(images.float() + 1.0, IMAGE_SIZE) - 1.0  # pad in [0, 2] so background stays -1
    return images.float()


def digits_as_input(images: Tensor) -> Tensor:
    """uint8 MNIST digits [N, 28, 28] -> classifier input [N, 1, 32, 32] in [-1, 1), as Stacked MNIST channels."""
    return to_symmetric(pad_digits(images, IMAGE_SIZE)).unsqueeze(1)


def split_indices(n_total: int, n_train: int, n_holdout: int, seed: int) -> Tuple[Tensor, Tensor]:
    """Disjoint seeded (train, held-out) index sets drawn from ``range(n_total)``."""
    if n_train + n_holdout > n_total:
        raise ValueError(f"n_train + n_holdout = {n_train + n_holdout} exceeds the {n_total} digits available")
    perm = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:n_train + n_holdout]


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random rotation (+-10 deg), scale (0.9-1.1) and shift (+-2 px) per digit, background kept at -1."""
    n = x.shape[0]
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    angle, scale = uniform(-math.pi / 18, math.pi / 18), uniform(0.9, 1.1)
    shift = uniform(-2.0, 2.0), uniform(-2.0, 2.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    half = IMAGE_SIZE / 2  # affine_grid works in [-1, 1] coordinates: a pixel is 1/half
    theta = torch.stack([torch.stack([cos, -sin, shift[0] / half], 1),
                         torch.stack([sin, cos, shift[1] / half], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1.0, grid, align_corners=False, padding_mode="zeros") - 1.0


@torch.no_grad()
def predict_digits(model: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Predicted digit [N] for images [N, H, W] or [N, 1, H, W] in [-1, 1]."""
    model.eval()
    out = [model(images[i:i + batch_size]).argmax(dim=1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def label_stacked(model: nn.Module, images: Tensor, batch_size: int = 1024) -> Tuple[Tensor, Tensor]:
    """Classify each channel of RGB images [N, 3, H, W]: ``(mode labels [N] in 0..999, digits [N, 3])``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected [N, 3, H, W] images, got shape {tuple(images.shape)}")
    n = images.shape[0]
    digits = predict_digits(model, images.reshape(n * 3, 1, *images.shape[-2:]), batch_size).reshape(n, 3)
    return stacked_label(digits), digits


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    return float((predict_digits(model, images) == labels).float().mean())


def fingerprint(mnist: MNIST) -> str:
    """md5 of the digits and labels, so a cache made from other data is never reused."""
    digest = hashlib.md5(mnist.images.numpy().tobytes())
    digest.update(mnist.labels.numpy().tobytes())
    return digest.hexdigest()


def train_classifier(mnist: MNIST, config: ClassifierConfig = ClassifierConfig(),
                     progress: bool = False) -> Tuple[DigitCNN, Dict[str, Any]]:
    """Train on ``config.n_train`` seeded digits of ``mnist``; returns the model (eval mode) and a report with
    the accuracy on the ``config.n_holdout`` held-out digits."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)  # weight init and dropout
    train_idx, hold_idx = split_indices(len(mnist), config.n_train, config.n_holdout, config.seed)
    x_train, y_train = digits_as_input(mnist.images[train_idx]), mnist.labels[train_idx]
    model = DigitCNN(config.width)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(config.n_train / config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, epochs=config.epochs,
                                                steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(config.seed + 1)
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(config.n_train, generator=gen)
        total = 0.0
        for i in range(0, config.n_train, config.batch_size):
            batch = order[i:i + config.batch_size]
            x = augment(x_train[batch], gen) if config.augment else x_train[batch]
            loss = F.cross_entropy(model(x), y_train[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch)
        if progress:
            print(f"epoch {epoch + 1}/{config.epochs}: train loss {total / config.n_train:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    held = accuracy(model, digits_as_input(mnist.images[hold_idx]), mnist.labels[hold_idx])
    report = {
        "heldout_accuracy": held,
        "n_heldout": int(len(hold_idx)),
        "data": mnist.description,
        "train_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),  # a plain str: weights_only loading rejects TorchVersion
    }
    return model, report


def cache_path(path: Optional[PathLike] = None) -> Path:
    if path is not None:
        return Path(path)
    folder = Path(os.environ[CACHE_ENV_VAR]) if os.environ.get(CACHE_ENV_VAR) else REPO_ROOT / "runs" / "cache"
    return folder / CACHE_NAME


def load_cached(path: Path, config: ClassifierConfig, data_fingerprint: str) -> Optional[Tuple[DigitCNN, Dict]]:
    """The cached model if ``path`` holds one trained with ``config`` on the same data; ``None`` when there is
    none, or it was trained with another configuration or data (it is then retrained and replaced). A file that
    is not a classifier cache (unreadable, not a dict, weights of other shapes) is a :class:`runs.RunError` naming
    it: it may be a user's file, and is never overwritten."""
    if not path.is_file():
        return None
    blob = runs.load_checkpoint(path, ("config", "fingerprint", "state_dict", "report"),
                                {"config": dict, "fingerprint": str, "state_dict": dict, "report": dict})
    if blob["config"] != dataclasses.asdict(config) or blob["fingerprint"] != data_fingerprint:
        return None
    model = DigitCNN(config.width)
    difference = runs.layout_difference(model.state_dict(), blob["state_dict"], "state_dict")
    runs.require(difference is None, path, difference or "")
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob["report"]


def load_or_train(config: ClassifierConfig = ClassifierConfig(), data_dir: Optional[PathLike] = None,
                  cache: Optional[PathLike] = None, retrain: bool = False, progress: bool = False,
                  mnist: Optional[MNIST] = None) -> Tuple[DigitCNN, Dict[str, Any]]:
    """The classifier for ``config``: from the cache when it matches, else trained and cached.

    The report holds ``heldout_accuracy``, ``data`` (which split), ``cached`` and ``cache_path``.
    """
    mnist = mnist if mnist is not None else load_mnist(config.split, data_dir)
    if mnist.split != config.split:
        raise ValueError(f"config.split is {config.split!r} but the digits are the {mnist.split} split")
    path, print_ = cache_path(cache), fingerprint(mnist)
    found = None if retrain else load_cached(path, config, print_)
    if found is not None:
        model, report = found
        return model, {**report, "cached": True, "cache_path": str(path)}
    model, report = train_classifier(mnist, config, progress)
    # Atomic: a concurrent reader never sees half a file.
    runs.save_checkpoint({"state_dict": model.state_dict(), "config": dataclasses.asdict(config),
                          "fingerprint": print_, "report": report}, path)
    return model, {**report, "cached": False, "cache_path": str(path)}
