"""The command line: train / eval / demo / bench / backends, and its errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

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
    # eval --set on a CPQL run: one one-step sample per state instead of the Q softmax over candidates
    assert cli.main(["eval", out, "--episodes", "1", "--device", "cpu", "--set", "eval_candidates=1"]) == 0
    with pytest.raises(SystemExit, match="eval_candidates must be"):
        cli.main(["eval", out, "--episodes", "1", "--device", "cpu", "--set", "eval_candidates=0"])
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
    # eval --set: evaluation fields only; eval_noise_scale=0 acts deterministically (the same returns for
    # two evaluations of the same seed whatever the evaluation generator draws)
    ev = ["eval", out, "--episodes", "2", "--seeds", "0", "--device", "cpu"]
    rets = []
    for k in range(2):
        tr.step = 12 + k  # (the evaluation generator is seeded by the step)
        tr.cfg.eval_noise_scale = 0.0
        rets.append(tr.evaluate(num_episodes=2, seeds=(0,))["returns"])
    assert rets[0] == rets[1]
    res_path = str(tmp_path / "ns0.json")
    assert cli.main(ev + ["--set", "eval_noise_scale=0", "--json", res_path]) == 0
    assert json.load(open(res_path))["returns"] == rets[0]
    with pytest.raises(SystemExit, match="evaluation fields only.*beta"):
        cli.main(ev + ["--set", "beta=1"])
    with pytest.raises(SystemExit, match="eval_noise_scale must be >= 0"):
        cli.main(ev + ["--set", "eval_noise_scale=-1"])


def test_train_qipo_preset_then_set(demo_minari_root, tmp_path):
    """--preset NAME starts from QIPO_PRESETS[NAME], --set overrides it, config.json records both."""
    from qipo_kernels.algos.qipo import QIPO_PRESETS, QIPOConfig

    out = str(tmp_path / "qipo")
    sets = ["pretrain_steps=3", "q_steps=2", "policy_steps=2", "q_support=2", "num_support=2", "hidden=8",
            "critic_hidden=8", "sample_steps=1", "eval_episodes=1", "pretrain_batch=16", "q_batch=16",
            "policy_batch=16", "tensorboard=0"]
    args = ["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", out, "--no-progress", "--device", "cpu",
            "--preset", "cpu-quick"]
    for s in sets:
        args += ["--set", s]
    assert cli.main(args) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["preset"] == "cpu-quick"
    cfg, preset = saved["config"], QIPO_PRESETS["cpu-quick"]
    # not overridden: the preset's value, which differs from the default (so the preset was applied)
    assert cfg["pretrain_lr"] == preset["pretrain_lr"] != QIPOConfig().pretrain_lr
    assert cfg["q_support_refresh"] == preset["q_support_refresh"] != QIPOConfig().q_support_refresh
    # overridden by --set after the preset
    assert cfg["pretrain_steps"] == 3 != preset["pretrain_steps"]
    assert cfg["pretrain_batch"] == 16 != preset["pretrain_batch"]
    # every preset changes only schedule lengths, batch sizes and learning rates
    allowed = {"pretrain_steps", "pretrain_batch", "pretrain_lr", "q_steps", "q_batch", "q_lr", "q_support_refresh",
               "policy_steps", "policy_batch", "policy_lr", "renew_every"}
    for name, p in QIPO_PRESETS.items():
        assert set(p) <= allowed, (name, set(p) - allowed)
    # without --preset: the defaults, and no "preset" key
    out2 = str(tmp_path / "plain")
    args2 = ["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", out2, "--no-progress", "--device", "cpu"]
    for s in sets + ["q_support_refresh=2", "renew_every=2"]:
        args2 += ["--set", s]
    assert cli.main(args2) == 0
    saved2 = json.load(open(os.path.join(out2, "config.json")))
    assert "preset" not in saved2 and saved2["config"]["pretrain_lr"] == QIPOConfig().pretrain_lr


def test_unknown_preset_is_refused_with_the_names(demo_minari_root, tmp_path):
    from qipo_kernels.algos.qipo import QIPO_PRESETS

    with pytest.raises(SystemExit) as ei:
        cli.main(["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", str(tmp_path / "x"),
                  "--preset", "gpu-huge"])
    msg = str(ei.value)
    assert "unknown preset 'gpu-huge'" in msg and all(name in msg for name in QIPO_PRESETS) and "\n" not in msg
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(SystemExit, match="applies to train qipo only"):
        cli.main(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(tmp_path / "y"),
                  "--preset", "cpu-quick"])
    assert not os.path.exists(tmp_path / "y")


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
    with pytest.raises(SystemExit, match="beta"):
        cli.main(["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", str(tmp_path / "b"), "--set", "beta=-1"])
    assert not os.path.exists(tmp_path / "b")   # nothing made for a run that cannot start


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
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert {"micro", "report", "speed_accuracy", "bench_cpu"} <= set(listed)
    assert not {"_common", "conftest", "cases", "run", "flops", "test_bench_loss", "__init__"} & set(listed)
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    r = subprocess.run([sys.executable, "-m", "qipo_kernels", "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert r.returncode == 0 and "demo" in r.stdout and "train" in r.stdout


# ---- safety and errors (issue 12) --------------------------------------------------------------------

QUICK_CPQL = ["--no-progress", "--device", "cpu", "--set", "hidden=8", "--set", "critic_hidden=8", "--set", "steps=6",
              "--set", "batch=8", "--set", "eval_episodes=0", "--set", "checkpoint_every=3", "--set", "log_every=2",
              "--set", "tensorboard=false", "--set", "step_start_ema=2"]


def _train(out, *extra):
    return cli.main(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(out)] + QUICK_CPQL + list(extra))


def test_fresh_never_deletes_what_the_package_did_not_make(demo_minari_root, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    monkeypatch.chdir(mine)
    with pytest.raises(SystemExit, match="not on this machine"):   # a typo: nothing is deleted
        cli.main(["train", "cpql", "--dataset", "mujoco/typo/medium-v0", "--out", ".", "--fresh"])
    with pytest.raises(SystemExit, match="--fresh refuses to delete .*not created by qipo-kernels"):
        _train(".", "--fresh")
    with pytest.raises(SystemExit, match="refuses to delete"):
        cli.main(["demo", "--quick", "--out", ".", "--fresh", "--no-progress"])
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (mine / "checkpoint.pt").exists()


def test_run_folder_holds_one_configuration(demo_minari_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--set", "reward_scale=2.5", "--set", "sigmas=2.0,0.5", "--threads", "2") == 0
    assert torch.get_num_threads() == 2
    text = capsys.readouterr().out
    assert "torch CPU threads: 2" in text
    s = json.load(open(out / "summary.json"))
    assert s["config"]["reward_scale"] == 2.5 and s["config"]["sigmas"] == [2.0, 0.5] and s["steps"] == 6
    # a changed field that cannot change on resume: refused, one line, naming it and the ways forward
    with pytest.raises(SystemExit) as ei:
        _train(out, "--set", "reward_scale=2.5", "--set", "sigmas=2.0,0.5", "--set", "hidden=16")
    msg = str(ei.value)
    assert "\n" not in msg and "hidden 8 -> 16" in msg and "--fresh" in msg and "--out" in msg
    assert json.load(open(out / "summary.json"))["config"]["hidden"] == 8
    # fields that may change on resume are applied: more steps, a new learning rate
    assert _train(out, "--set", "reward_scale=2.5", "--set", "sigmas=2.0,0.5", "--set", "steps=8",
                  "--set", "lr=1e-4") == 0
    text = capsys.readouterr().out
    assert "resuming from step 6 of 8" in text and "torch CPU threads: 1 (default" in text
    tr = cli.load_checkpoint(str(out), "cpu")
    assert tr.step == 8 and all(g["lr"] == 1e-4 for o in tr.optims.values() for g in o.param_groups)
    # --fresh on the package's own folder starts over
    (out / "extra.csv").write_text("step\n1\n")
    assert _train(out, "--fresh", "--set", "hidden=16") == 0
    assert json.load(open(out / "summary.json"))["config"]["hidden"] == 16 and not (out / "extra.csv").exists()


def test_resume_keeps_the_runs_own_settings_for_fields_the_command_does_not_name(demo_minari_root, tmp_path,
                                                                                   capsys):
    # a run made through the Python API with settings the CLI's defaults do not have ...
    out = tmp_path / "api-run"
    ds = data.load_minari(data.DEMO_DATASET_ID)
    cfg = dict(hidden=8, critic_hidden=8, steps=6, batch=8, eval_episodes=0, checkpoint_every=3, log_every=2,
               tensorboard=False, step_start_ema=2, lr=1e-4, seed=5)
    cli.build_trainer("cpql", cfg, str(out), "cpu", ds, progress_bar=False).fit()
    # ... resumed by a command that names only the new step count: the run keeps its own architecture,
    # learning rate, seed, logging and checkpointing instead of the defaults (which would refuse the
    # architecture, and silently turn on TensorBoard and change the learning rate)
    args = ["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(out), "--no-progress"]
    assert cli.main(args + ["--set", "steps=8"]) == 0
    text = capsys.readouterr().out
    assert "with its own settings for the fields not given here" in text and "hidden=8" in text and "lr=0.0001" in text
    assert "resuming from step 6 of 8 in" in text and "with steps 6 -> 8" in text and "tensorboard" not in text.split(
        "resuming from")[-1]
    s = json.load(open(out / "summary.json"))
    assert s["steps"] == 8 and s["config"]["lr"] == 1e-4 and s["config"]["tensorboard"] is False
    assert s["config"]["seed"] == 5 and s["config"]["checkpoint_every"] == 3
    assert not (out / "tb").exists()
    tr = cli.load_checkpoint(str(out), "cpu")
    assert tr.step == 8 and all(g["lr"] == 1e-4 for o in tr.optims.values() for g in o.param_groups)
    # a field the command names is still compared: a new learning rate applies, a new architecture is refused
    assert cli.main(args + ["--set", "steps=9", "--set", "lr=3e-4"]) == 0
    assert "lr 0.0001 -> 0.0003" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="hidden 8 -> 16"):
        cli.main(args + ["--set", "steps=9", "--set", "hidden=16"])
    # --fresh starts from the command line's settings alone
    assert cli.main(args + ["--fresh", "--set", "steps=2", "--set", "eval_episodes=0", "--set", "hidden=8",
                            "--set", "critic_hidden=8", "--set", "batch=8", "--set", "tensorboard=false"]) == 0
    assert json.load(open(out / "summary.json"))["config"]["lr"] != 1e-4


def test_every_error_is_one_line(demo_minari_root, tmp_path, capsys, monkeypatch):
    def one_line(args, match, code=None):
        with pytest.raises(SystemExit) as ei:
            cli.main(args)
        msg = str(ei.value) if code is None else capsys.readouterr().err
        assert msg.count("\n") <= (0 if code is None else 1) and re.search(match, msg), msg
        if code is not None:
            assert ei.value.code == code
        return msg

    for field, value in (("lr", "0"), ("gamma", "2"), ("batch", "0"), ("reward_scale", "big")):
        one_line(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(tmp_path / "x"),
                  "--set", f"{field}={value}"], field)
    assert not (tmp_path / "x").exists()
    one_line(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--set", "sigmas=a,b"], "sigmas: expected comma")
    one_line(["train", "cpql-online", "--dataset", data.DEMO_DATASET_ID], "takes no --dataset")
    one_line(["eval", str(tmp_path), "--episodes", "0"], "--episodes: expected an integer >= 1", code=2)
    one_line(["train", "cpql", "--threads", "0"], "--threads: expected an integer >= 1", code=2)
    one_line(["eval", str(tmp_path), "--seeds", "a,b"], "--seeds expects comma-separated integers")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    # --json into a place that cannot be written: refused before the checkpoint is even read
    one_line(["eval", str(tmp_path / "no-run"), "--json", str(blocker / "res.json")], "cannot write to .*blocker")
    one_line(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(blocker / "run")] + QUICK_CPQL,
             "cannot write to .*blocker")
    # a corrupt checkpoint, on eval and on resume
    out = tmp_path / "run"
    assert _train(out) == 0
    ck = out / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    one_line(["eval", str(out)], "cannot read checkpoint .*checkpoint.pt: it is corrupt or truncated")
    one_line(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(out)] + QUICK_CPQL,
             "cannot read checkpoint")
    ck.unlink()
    # a disk that fills up during the run
    import qipo_kernels.algos.common as common

    def full(obj, f):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.torch, "save", full)
    one_line(["train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out", str(tmp_path / "full")] + QUICK_CPQL,
             "No space left on device")
    monkeypatch.undo()
    # --debug shows the traceback (the exception itself), in either position
    with pytest.raises(cli.CLIError, match="no checkpoint"):
        cli.main(["--debug", "eval", str(tmp_path / "nothing")])
    with pytest.raises(cli.CLIError, match="no checkpoint"):
        cli.main(["eval", str(tmp_path / "nothing"), "--debug"])


def test_ctrl_c_on_the_command_line_writes_a_checkpoint(demo_minari_root, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "qipo_kernels", "train", "cpql", "--dataset", data.DEMO_DATASET_ID, "--out",
            str(out)] + QUICK_CPQL + ["--set", "steps=1000000", "--set", "log_every=1", "--set", "checkpoint_every=0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), MINARI_DATASETS_PATH=demo_minari_root)
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            csv_path = out / "train.csv"
            if csv_path.exists() and len(csv_path.read_text().splitlines()) > 3:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, stderr
    assert "Traceback" not in stderr and "qipo-kernels: interrupted" in stderr
    assert "interrupted: checkpoint of step" in stdout
    st = torch.load(str(out / "checkpoint.pt"), weights_only=True)
    assert st["step"] >= 3


def test_load_minari_cuda_on_a_cpu_build_is_a_clear_error(demo_minari_root):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        data.load_minari(data.DEMO_DATASET_ID, device="cuda")


def test_bench_runs_modules_and_passes_arguments_on(capfd):
    assert cli.main(["bench", "report", "--", "--help"]) == 0
    out = capfd.readouterr().out
    assert "usage: python -m bench.report" in out and "--no-plots" in out
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        cli.main(["bench", "nope"])
    with pytest.raises(SystemExit, match="for `bench` only"):
        cli.main(["backends", "--", "x"])


_BLOCK_RL = "import sys\nfor m in ('minari', 'gymnasium', 'h5py'):\n    sys.modules[m] = None\n"


def test_without_the_rl_extra_the_tests_skip_with_the_reason(tmp_path):
    """`pip install -e ".[test]"` then pytest: tests that need minari / gymnasium skip, saying why."""
    (tmp_path / "block_rl.py").write_text(_BLOCK_RL)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "block_rl", "-q", "-rs", "-p", "no:cacheprovider",
                        os.path.join(root, "tests", "test_cli.py") + "::test_cli_errors",
                        os.path.join(root, "tests", "test_algos.py") + "::test_cpql_online_smoke_and_resume",
                        os.path.join(root, "tests", "test_algos.py") + "::test_configs_reject_bad_values"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 passed, 2 skipped" in r.stdout and "needs minari" in r.stdout and "gymnasium" in r.stdout


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
