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


def test_readme_data_example_runs(tmp_path, monkeypatch):
    """The data example (embedded dataset, a policy_fn, evaluate) runs as written."""
    import pytest

    pytest.importorskip("minari")
    pytest.importorskip("gymnasium")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # (the C++ backend's thread count; 2 shared cores)
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Data: Minari datasets and the embedded offline task\n", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(block, "README.md (data example)", "exec"), scope)
    result = scope["result"]
    assert result["episodes"] == 30 and len(result["returns"]) == 30
    assert scope["batch"]["obs"].shape == (256, scope["demo"].obs_dim)
    assert result["normalized_mean"] is not None


def test_readme_foreign_actor_example_runs(tmp_path, monkeypatch):
    """The "Using your trained ... actor" block, on files saved as the official save_model does (the
    official module layouts are built by tests/_official.py)."""
    import warnings

    from _official import OfficialCritic, OfficialDiffusion, OfficialMLP

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split("## Using your trained CPQL / Diffusion-QL / QIPO actor\n", 1)[1]
    block = block.split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # np.sqrt on a tensor, as the official module
        diff = OfficialDiffusion(OfficialMLP(17, 6), 5, "vp")
    torch.save(diff.state_dict(), tmp_path / "actor.pth")
    torch.save(OfficialCritic(17, 6).state_dict(), tmp_path / "critic.pth")
    torch.save(OfficialMLP(17, 6).state_dict(), tmp_path / "cpql_actor.pth")
    torch.save(OfficialCritic(17, 6, norm="layernorm").state_dict(), tmp_path / "cpql_critic.pth")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md (foreign actors)", "exec"), scope)
    assert scope["dql"].kind == "ddpm" and scope["cpql"].kind == "consistency"
    assert scope["a"].shape == (8, 6) and torch.isfinite(scope["a"]).all()
