"""The command line: train / eval / demo / bench / backends, and its errors."""
import json
import os
import subprocess
import sys

import pytest

from qipo_kernels import cli, data


pytestmark = pytest.mark.usefixtures("one_thread")




TINY_CPQL = ["--set", "hidden=16", "--set", "critic_hidden=16", "--set", "steps=12", "--set", "batch=16",
             "--set", "eval_episodes=1", "--set", "eval_candidates=4", "--set", "checkpoint_every=5",
             "--set", "log_every=4", "--set", "tensorboard=false"]


def test_train_then_eval_cpql(demo_minari_root, tmp_path, capsys):
    out = str(tmp_path / "cpql")
    assert cli.main(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", out, "--no-progress",
                     "--device", "cpu", "--seed", "3"] + TINY_CPQL) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 12 and summary["config"]["seed"] == 3 and summary["config"]["hidden"] == 16
    assert os.path.exists(os.path.join(out, "train.csv")) and os.path.exists(os.path.join(out, "eval.csv"))
    printed = capsys.readouterr().out
    assert "return" in printed
    # a dataset id that names no CPQL task says so, in one line naming the preset it falls back to
    line = [ln for ln in printed.splitlines() if "CPQL" in ln]
    assert len(line) == 1 and "matches no CPQL task preset" in line[0] and "generic CPQLConfig defaults" in line[0]
    assert "eta 1" in line[0] and "grad_norm 5" in line[0]
    assert summary["train_time_s"] >= 0 and summary["train_wall_s"] > 0
    res_path = str(tmp_path / "res.json")
    assert cli.main(["eval", out, "--episodes", "2", "--seeds", "0,1", "--device", "cpu", "--json", res_path]) == 0
    res = json.load(open(res_path))
    assert res["episodes"] == 4 and res["seeds"] == [0, 1]
    # a finished run resumes as finished: no extra steps
    assert cli.main(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", out, "--no-progress",
                     "--device", "cpu", "--seed", "3"] + TINY_CPQL) == 0
    assert json.load(open(os.path.join(out, "summary.json")))["steps"] == 12


def test_train_qipo_and_load_checkpoint(demo_minari_root, tmp_path):
    out = str(tmp_path / "qipo")
    sets = ["pretrain_steps=4", "q_steps=4", "policy_steps=4", "q_support=2", "num_support=2", "renew_every=2",
            "q_support_refresh=2", "hidden=8", "critic_hidden=8", "sample_steps=1", "eval_episodes=1",
            "pretrain_batch=16", "q_batch=16", "policy_batch=16", "tensorboard=0", "path=vp"]
    args = ["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", out, "--no-progress", "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 0
    tr = cli.load_checkpoint(out)
    assert tr.algo == "qipo" and tr.step == 12 and tr.cfg.path == "vp"
    obs = tr.dataset.obs[:3]
    assert tr.policy_fn()(obs).shape == (3, 1)


def test_cli_errors(demo_minari_root, tmp_path):
    with pytest.raises(SystemExit, match="--dataset"):
        cli.main(["train", "qipo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown QIPOConfig field 'betta'"):
        cli.main(["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--set", "betta=3"])
    with pytest.raises(SystemExit, match="key=value"):
        cli.main(["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--set", "beta"])
    with pytest.raises(SystemExit, match="minari download|make_local_dataset|not found|No dataset"):
        cli.main(["train", "cpql", "--dataset", "mujoco/nosuchenv/medium-v0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no checkpoint"):
        cli.main(["eval", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match="applies to cpql only"):
        cli.main(["train", "qipo", "--task", "hopper-medium", "--dataset", data.DEMO_DATASET_ID])
    with pytest.raises(SystemExit):
        cli.main(["train", "sac"])
    with pytest.raises(ValueError, match="beta"):
        cli.main(["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", str(tmp_path / "b"), "--set", "beta=-1"])


def test_demo_quick(demo_minari_root, tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--quick", "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "behaviour (dataset)" in text and "QIPO" in text and "CPQL" in text and "integrate" in text
    s = json.load(open(os.path.join(out, "demo_summary.json")))
    assert s["quick"] and s["behaviour"]["episodes"] == 100
    ops = {(r["op"], r["backend"].split("->")[0]) for r in s["backend_speeds"]}
    assert {("integrate", "torch"), ("integrate", "auto"), ("act", "torch"), ("consistency_sample", "auto")} <= ops
    assert all(r["max_abs_diff_vs_torch"] < 1e-3 for r in s["backend_speeds"])


def test_bench_backends_and_module_entry(capsys):
    assert cli.main(["bench"]) == 0
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    r = subprocess.run([sys.executable, "-m", "qipo_kernels", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0 and "demo" in r.stdout and "train" in r.stdout


def test_eval_line_prints_the_standard_error_and_labels_it(capsys):
    import numpy as np

    """`eval` prints mean ± s.e. (labelled) where it used to print the s.d. after "±"."""
    from qipo_kernels.cli import _print_eval

    rets = [10.0, 12.0, 14.0, 16.0, 18.0]
    sd = float(np.std(rets))
    _print_eval("qipo", {"mean": 14.0, "std": sd, "episodes": 5, "normalized_mean": 50.0,
                         "normalized_std": 2 * sd, "returns": rets})
    out = capsys.readouterr().out
    se = float(np.std(rets, ddof=1) / np.sqrt(5))       # 1.414
    assert f"return 14.0 ± {se:.1f} s.e." in out
    assert f"normalised 50.0 ± {2 * se:.1f} s.e." in out
    assert f"s.d. {sd:.1f}" in out
    _print_eval("qipo", {"mean": 3.0, "std": 0.0, "episodes": 1, "normalized_mean": None, "normalized_std": None})
    assert "s.e. n/a" in capsys.readouterr().out
