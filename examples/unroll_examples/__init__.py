"""The pieces the experiment scripts in ``examples/gan/`` share; the scripts themselves (what a user runs) are the
``*.py`` files one folder up.

- :mod:`runs`: run management for every script: a lock per output folder, atomic files, checkpoints read with
  ``weights_only=True``, ``--resume`` that refuses other settings, divergence named by iteration and seed, worker
  processes that die with their parent. :mod:`cli`: ``--help`` with every default, ``--seeds`` ranges, threads.
- The 2-D mixtures (Sec. 3.1, App. A, B): :mod:`data` (the datasets), :mod:`models` (App. A's networks),
  :mod:`metrics` (HQ, modes, reverse KL, energy distance), :mod:`training` (the vmapped multi-seed loop),
  :mod:`sweeps` (sweeps of runs and their results pages), :mod:`ablations` (what the App. B sweeps share).
- The images (Sec. 3.2-3.4, App. C-F): :mod:`mnist_data`, :mod:`cifar_data` (loaders), :mod:`image_models`,
  :mod:`image_metrics`, :mod:`digit_classifier` (labels Stacked MNIST), :mod:`diversity` (Sec. 3.4),
  :mod:`image_training` (the loop, several runs, workers), :mod:`image_experiment` (the scripts' flags, folder,
  tables, outputs).
- :mod:`report`: what every results page is made of (tables, mean ± standard error with one convention, kept
  notes, the command that made it, per-seed files); :mod:`plotting`: every figure.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository's root folder (default places of results pages, data and caches)."""
