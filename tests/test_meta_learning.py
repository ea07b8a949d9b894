"""examples/meta_learning.py (the tutorial's code) runs, learns a larger weight decay that lowers the validation
loss, and docs/tutorial.md shows only code that is in it."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import meta_learning

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_code_blocks_are_the_examples_code() -> None:
    source = (ROOT / "examples" / "meta_learning.py").read_text()
    setup, *blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "tutorial.md").read_text(), flags=re.S)
    # The page is one program (tests/test_docs_code.py runs it): its first block is what main() gets from outside,
    # the example's imports, its seed and its default arguments.
    statements = [line for line in setup.splitlines() if line.strip()]
    imports = [line for line in statements if line.startswith(("import ", "from "))]
    assert set(imports) <= set(source.splitlines())
    defaults = {name: p.default for name, p in inspect.signature(meta_learning.main).parameters.items()}
    assert [line for line in statements if line not in imports] == [
        f"torch.manual_seed({defaults['seed']})",
        "warmup_steps, meta_steps, final_steps, K = "
        f"{defaults['warmup_steps']}, {defaults['meta_steps']}, {defaults['final_steps']}, {defaults['K']}"]
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
