"""The README's API example is executed, so the documentation cannot drift from the code."""
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_api_example_runs():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split("## API\n```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block, "README.md (API example)", "exec"), scope)
    assert scope["acts"].shape == (256, 64, 6)
    assert scope["a"].shape == (256, 6)
    assert torch.isfinite(scope["loss"]) and scope["pred"].grad is None and scope["net"].out.weight.grad is not None
