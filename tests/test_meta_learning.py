"""examples/meta_learning.py (the tutorial's code) runs, learns a larger weight decay that lowers the validation
loss, and docs/tutorial.md shows only code that is in it."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import meta_learning  # noqa: E402


def test_tutorial_code_blocks_are_the_examples_code() -> None:
    source = (ROOT / "examples" / "meta_learning.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tutorial.md").read_text(), flags=re.S)
    assert len(blocks) >= 6
    for block in blocks:
        # The blocks are main()'s body, shown without its indentation.
        assert textwrap.indent(block, "    ") in source, block


def test_meta_learning_example_learns_a_useful_weight_decay(one_thread: None) -> None:
    results = meta_learning.main(warmup_steps=20, meta_steps=20, final_steps=10, K=5)
    # The training set is fitted to its noise: the hypergradient must raise the weight decay from 1e-3, and the
    # learned value must beat the control that kept 1e-3, on validation data, at the cost of training loss.
    assert results["learned_weight_decay"] > 2e-3
    assert results["validation_loss"] < results["control_validation_loss"]
    assert results["train_loss"] > results["control_train_loss"]
