"""QIPO / CPQL trainers: configs, per-task defaults, resumable checkpoints, end-to-end improvement."""
import csv
import dataclasses
import json
import os
import time

import numpy as np
import pytest
import torch

from qipo_kernels import backends, data
from qipo_kernels.algos import (CPQL, CPQL_TASK_DEFAULTS, QIPO, CPQLConfig, CPQLOnline, CPQLOnlineConfig, QIPOConfig,
                                StopTraining, cpql_config_for, task_key)
from qipo_kernels.algos.common import RunLogger, atomic_torch_save, atomic_write_json, parse_value
from qipo_kernels.demo import DEMO_CPQL, DEMO_QIPO

from conftest import tiny_qipo_config


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_ds(demo_minari_root):
    return data.load_minari(data.DEMO_DATASET_ID)


@pytest.fixture(scope="module")
def tiny_ds():
    """300 synthetic Pendulum-like transitions (no env needed for training)."""
    rng = np.random.default_rng(0)
    n = 300
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.normal(size=n)], 1)
    nobs = obs + 0.05 * rng.normal(size=obs.shape)
    act = rng.uniform(-2, 2, (n, 1))
    rew = -(th ** 2) - 0.001 * act[:, 0] ** 2
    term = np.zeros(n)
    trunc = np.zeros(n)
    trunc[199::200] = 1
    return data.OfflineDataset.from_arrays(obs, act, rew, nobs, term, trunc, action_low=np.array([-2.0]),
                                           action_high=np.array([2.0]), dataset_id="tiny", env_id="Pendulum-v1")


_qcfg = tiny_qipo_config


def _ccfg(**kw):
    c = dict(hidden=16, depth=2, critic_hidden=16, critic_depth=2, steps=25, batch=32, step_start_ema=10,
             eval_episodes=0, log_every=4, checkpoint_every=6, tensorboard=False)
    c.update(kw)
    return CPQLConfig(**c)


def _same_modules(a, b):
    for k in a.modules:
        for (n1, p1), (n2, p2) in zip(a.modules[k].state_dict().items(), b.modules[k].state_dict().items()):
            assert n1 == n2
            assert torch.equal(p1, p2), f"{k}.{n1} differs"


def _kill_at(k):
    def cb(tr, metrics):
        if tr.step == k:
            raise StopTraining(f"killed at {k}")
    return cb


def _ccfg_decay(**kw):
    return _ccfg(lr_decay=True, **kw)


@pytest.mark.parametrize("algo,kill", [("qipo", 8), ("qipo", 19), ("qipo", 31), ("cpql", 14), ("cpql-lr-decay", 14)])
def test_killed_run_resumes_identically(tiny_ds, tmp_path, algo, kill):
    """Kill after `kill` steps (checkpoints every 5/6 steps), resume: bit-identical to an uninterrupted run
    (with CPQL's lr_decay too: the resumed optimizers follow the same cosine from the checkpoint's step)."""
    cls, cfg = {"qipo": (QIPO, _qcfg), "cpql": (CPQL, _ccfg), "cpql-lr-decay": (CPQL, _ccfg_decay)}[algo]
    full = cls(tiny_ds, cfg(), out_dir=str(tmp_path / "full"), progress_bar=False)
    full.fit()
    run = cls(tiny_ds, cfg(), out_dir=str(tmp_path / "run"), progress_bar=False, callback=_kill_at(kill))
    with pytest.raises(StopTraining):
        run.fit()
    ck = torch.load(str(tmp_path / "run" / "checkpoint.pt"), weights_only=False)
    assert ck["step"] < kill and ck["step"] % cfg().checkpoint_every == 0
    resumed = cls(tiny_ds, cfg(), out_dir=str(tmp_path / "run"), progress_bar=False)
    summary = resumed.fit()
    assert summary["steps"] == full.total_steps
    _same_modules(full, resumed)
    for k in full.optims:
        s1, s2 = full.optims[k].state_dict()["state"], resumed.optims[k].state_dict()["state"]
        for i in s1:
            assert torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"])
    # the CSV logs of the resumed run hold each logged step once, as the uninterrupted run's do
    for name in os.listdir(tmp_path / "full"):
        if name.endswith(".csv"):
            a = [r["step"] for r in csv.DictReader(open(tmp_path / "full" / name))]
            b = [r["step"] for r in csv.DictReader(open(tmp_path / "run" / name))]
            assert a == b, name
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


@pytest.mark.parametrize("algo", ["qipo", "cpql"])
def test_compile_trains_as_eager_and_keeps_checkpoints(tiny_ds, tmp_path, algo):
    """compile=True (torch.compile of the trained networks' forward) gives the eager run's networks to
    float32 rounding (same seed, same draws: the compiled kernels only fuse), writes a checkpoint with the
    same keys, and a run may be resumed with compile switched (a speed option, not the algorithm)."""
    cls, cfg = (QIPO, _qcfg) if algo == "qipo" else (CPQL, _ccfg)
    eager = cls(tiny_ds, cfg(), out_dir=str(tmp_path / "eager"), progress_bar=False)
    eager.fit()
    comp = cls(tiny_ds, cfg(compile=True), out_dir=str(tmp_path / "comp"), progress_bar=False)
    comp.fit()
    for name in comp.optims:
        m = comp.modules[name]
        assert getattr(getattr(m, "net", m), "_qipo_compiled", False) or getattr(m, "_qipo_compiled", False), name
    for k in eager.modules:
        for (n1, p1), (n2, p2) in zip(eager.modules[k].state_dict().items(), comp.modules[k].state_dict().items()):
            assert n1 == n2
            torch.testing.assert_close(p2, p1, rtol=2e-3, atol=2e-4, msg=f"{k}.{n1}")
    ck_e = torch.load(str(tmp_path / "eager" / "checkpoint.pt"), weights_only=False)
    ck_c = torch.load(str(tmp_path / "comp" / "checkpoint.pt"), weights_only=False)
    assert {k: list(v) for k, v in ck_e["modules"].items()} == {k: list(v) for k, v in ck_c["modules"].items()}
    longer = {"policy_steps": 16} if algo == "qipo" else {"steps": 30}
    resumed = cls(tiny_ds, cfg(compile=False, **longer), out_dir=str(tmp_path / "comp"), progress_bar=False)
    assert resumed.fit()["steps"] == resumed.total_steps
    assert "compile" in resumed.resume_changes
    with pytest.raises(TypeError, match="compile must be a bool"):
        cfg(compile="yes")
    under_ddp = cls(tiny_ds, cfg(compile=True), out_dir=str(tmp_path / "ddp"), progress_bar=False)
    under_ddp.dist = object()  # what distributed.attach sets; refused before anything is compiled
    with pytest.raises(ValueError, match="compile=True is not supported under torch.distributed"):
        under_ddp.fit()


def test_qipo_resume_regenerates_a_support_set_too_big_to_store(tiny_ds, tmp_path):
    """With store_support_max=0 the support set is redrawn on resume: nothing lost, the run completes."""
    cfg = _qcfg(store_support_max=0)
    run = QIPO(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False, callback=_kill_at(33))
    with pytest.raises(StopTraining):
        run.fit()
    ck = torch.load(str(tmp_path / "checkpoint.pt"), weights_only=False)
    assert "support" not in ck["algo_state"] and ck["step"] == 30
    resumed = QIPO(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    assert resumed.try_resume()
    assert resumed.support is not None and resumed.support.shape == (len(tiny_ds), 4, 1)
    assert resumed.step == 30
    summary = resumed.fit()
    assert summary["steps"] == 36


def test_qipo_checkpoint_drops_large_support_sets_by_default(tiny_ds, tmp_path):
    """Support sets above store_support_max (1M numbers by default) are not written into checkpoints
    (they made a 100k-transition checkpoint 161 MB); resuming re-draws them."""
    assert QIPOConfig().store_support_max == 1_000_000
    cfg = _qcfg(num_support=3400, renew_chunk=300, store_support_max=QIPOConfig().store_support_max)  # 1.02M actions
    run = QIPO(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False, callback=_kill_at(26))
    with pytest.raises(StopTraining):
        run.fit()
    assert run.support is not None and run.support.numel() > cfg.store_support_max
    path = tmp_path / "checkpoint.pt"
    ck = torch.load(str(path), weights_only=False)
    assert "support" not in ck["algo_state"] and "support_q" not in ck["algo_state"]
    assert os.path.getsize(path) < 1_000_000  # the networks and optimisers only (~0.1 MB here)
    resumed = QIPO(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    assert resumed.try_resume() and resumed.support.shape == (len(tiny_ds), 3400, 1)


@pytest.mark.skipif(bool(backends.backend_reasons("cpp", "cpu")), reason="the C++ extension is not built here")
def test_qipo_runs_every_stage_with_backend_cpp(tiny_ds, tmp_path):
    """backend='cpp' used to crash at the first stage-3 step (no cpp flow_path); the elementwise path
    op now runs on the reference inside a cpp run, the loss and the samplers on cpp."""
    cfg = _qcfg(backend="cpp", pretrain_steps=3, q_steps=3, policy_steps=4)
    tr = QIPO(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    summary = tr.fit()
    assert summary["steps"] == 10 and tr.stage() == "policy"
    ref = QIPO(tiny_ds, _qcfg(backend="torch", pretrain_steps=3, q_steps=3, policy_steps=4),
               out_dir=str(tmp_path / "ref"), progress_bar=False)
    ref.fit()
    for k in ("policy", "critic"):  # the same run up to float rounding of the fused kernels
        for p, q in zip(tr.modules[k].parameters(), ref.modules[k].parameters()):
            torch.testing.assert_close(p, q, atol=1e-3, rtol=1e-3)


def test_train_time_is_process_cpu_time_and_wall_time_is_kept_apart(tiny_ds, tmp_path, monkeypatch):
    from qipo_kernels.algos import common

    class FakeClock:
        def __init__(self):
            self.cpu, self.wall = 0.0, 0.0

        def process_time(self):
            self.cpu += 1.0
            return self.cpu

        def perf_counter(self):
            self.wall += 10.0
            return self.wall

        def time(self):
            return 0.0

    monkeypatch.setattr(common, "time", FakeClock())
    summary = QIPO(tiny_ds, _qcfg(), out_dir=str(tmp_path), progress_bar=False).fit()
    assert summary["train_time_s"] == summary["steps"] == 36  # one fake CPU second per step
    assert summary["train_wall_s"] >= 10 * 36


def test_qipo_support_and_options(tiny_ds, tmp_path):
    cfg = _qcfg(keep_data_action=True, normalize="batch", path="vp", pretrain_steps=2, q_steps=2, policy_steps=3)
    tr = QIPO(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    tr.fit()
    assert torch.equal(tr.support[:, 0], tiny_ds.actions)
    with torch.no_grad():
        torch.testing.assert_close(tr.support_q[:, 0], tr.critic.q_min(tiny_ds.obs, tiny_ds.actions))
    assert tr.support.abs().max() <= 1
    # the Q backup: V(s') = sum softmax(q_alpha Q') Q' over the behaviour samples
    assert tr.stage() == "policy"


def test_configs_reject_bad_values():
    with pytest.raises(ValueError, match="path"):
        QIPOConfig(path="flow")
    with pytest.raises(ValueError, match="solver"):
        QIPOConfig(path="vp", solver="euler")
    with pytest.raises(ValueError, match="normalize"):
        QIPOConfig(normalize="all")
    with pytest.raises(ValueError, match="beta"):
        QIPOConfig(beta=-1)
    with pytest.raises(ValueError, match="num_support"):
        QIPOConfig(num_support=0)
    with pytest.raises(ValueError, match="gamma"):
        CPQLConfig(gamma=1.5)
    with pytest.raises(ValueError, match="ema_decay"):
        CPQLConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="eval_select"):
        CPQLConfig(eval_select="max")
    with pytest.raises(ValueError, match="env_id"):
        CPQLOnlineConfig(env_id="")
    # a float field given as a string (or a bool) is refused by name, not kept to fail far away: CPQLConfig
    # kept lr="0.001" for its Adam and QIPOConfig beta="3" for the softmax before this check
    for cls, field, bad in ((CPQLConfig, "lr", "0.001"), (QIPOConfig, "beta", "3"), (CPQLConfig, "eta", True),
                            (QIPOConfig, "bound_dequant", "0.1"), (CPQLOnlineConfig, "lr", b"1e-3")):
        with pytest.raises(TypeError, match=f"{field} must be a number, got {type(bad).__name__}"):
            cls(**{field: bad})
    assert CPQLConfig(lr=1).lr == 1 and QIPOConfig(beta=np.float32(2.0)).beta == 2.0  # real numbers pass
    with pytest.raises(TypeError, match="QIPOConfig"):
        QIPO(None, CPQLConfig())
    with pytest.raises(TypeError, match="CPQLConfig"):
        CPQL(None, QIPOConfig())


def test_cpql_task_defaults():
    assert task_key("mujoco/halfcheetah/medium-v0") == "halfcheetah-medium"
    assert task_key("hopper-medium-replay-v2") == "hopper-medium-replay"
    assert task_key("antmaze-umaze-diverse-v0") == "antmaze-umaze-diverse"
    assert task_key("qipo/pendulum/mixed-v0") is None
    c = cpql_config_for("halfcheetah-medium")
    assert (c.lr, c.eta, c.grad_norm, c.steps) == (3e-4, 2.0, 9.0, 2_000_000)
    c = cpql_config_for("mujoco/walker2d/medium-v0", batch=64)
    assert (c.eta, c.grad_norm, c.batch, c.task) == (1.0, 1.0, 64, "walker2d-medium")
    c = cpql_config_for("antmaze-medium-play")
    assert c.lr == 1e-3 and c.eta == 4.0 and c.max_q_backup and c.reward_scale == "cpql-antmaze" and c.steps == 1_000_000
    # CPQL samples multistep on AntMaze: ts = [0, 20, 40] of its N = 40 Karras levels, clipped
    assert c.sigmas == pytest.approx((80.0, 2.2404397589312026, 0.002), rel=1e-12)
    assert cpql_config_for("hopper-medium").sigmas is None
    assert cpql_config_for("pen-human").lr == 3e-5
    assert len(CPQL_TASK_DEFAULTS) == 17
    with pytest.raises(ValueError, match="known tasks"):
        cpql_config_for("pendulum-mixed")
    with pytest.raises(ValueError, match="unknown CPQLConfig"):
        cpql_config_for("hopper-medium", etaa=1.0)


def test_cpql_lr_decay_follows_the_cosine(tiny_ds, tmp_path):
    """lr_decay=True: update k of a 25-step run uses lr0 (1 + cos(pi k / 25)) / 2 in both optimizers (logged as
    "lr"); off (the default), the optimizers keep lr0 and nothing is logged. A non-bool is refused by name."""
    lr0, seen = 1e-3, []

    def record(tr, metrics):
        seen.append((metrics["lr"], [g["lr"] for o in tr.optims.values() for g in o.param_groups]))

    tr = CPQL(tiny_ds, _ccfg(lr=lr0, lr_decay=True), out_dir=str(tmp_path / "decay"), progress_bar=False,
              callback=record)
    tr.fit()
    assert len(seen) == 25
    for k, (logged, in_optims) in enumerate(seen):
        want = lr0 * 0.5 * (1.0 + np.cos(np.pi * k / 25))
        assert logged == pytest.approx(want, rel=1e-12) and in_optims == pytest.approx([want, want], rel=1e-12), k
    assert seen[0][0] == lr0 and seen[-1][0] > 0 and tr.scheduled_lr(25) == 0.0 and tr.scheduled_lr(99) == 0.0
    rows = list(csv.DictReader(open(tmp_path / "decay" / "train.csv")))
    assert rows and all(float(r["lr"]) < lr0 for r in rows)
    plain, lrs = [], []
    tr = CPQL(tiny_ds, _ccfg(lr=lr0), out_dir=str(tmp_path / "plain"), progress_bar=False,
              callback=lambda t, m: (plain.append("lr" in m), lrs.extend(g["lr"] for o in t.optims.values()
                                                                         for g in o.param_groups)))
    tr.fit()
    assert not any(plain) and set(lrs) == {lr0} and tr.scheduled_lr(10) == lr0
    # a run killed mid-decay and resumed with lr_decay off goes on at lr0 (its optimizers held the decayed lr)
    run = CPQL(tiny_ds, _ccfg(lr=lr0, lr_decay=True), out_dir=str(tmp_path / "off"), progress_bar=False,
               callback=_kill_at(14))
    with pytest.raises(StopTraining):
        run.fit()
    held = torch.load(str(tmp_path / "off" / "checkpoint.pt"), weights_only=False)["optims"]["actor"]["param_groups"]
    assert held[0]["lr"] < lr0
    off = CPQL(tiny_ds, _ccfg(lr=lr0), out_dir=str(tmp_path / "off"), progress_bar=False)
    assert off.try_resume() and "lr_decay" in off.resume_changes
    assert {g["lr"] for o in off.optims.values() for g in o.param_groups} == {lr0}
    with pytest.raises(TypeError, match="lr_decay must be a bool"):
        _ccfg(lr_decay="yes")
    with pytest.raises(TypeError, match="lr_decay must be a bool"):
        CPQLOnlineConfig(lr_decay=1)


def test_cpql_max_q_backup_and_multistep(tiny_ds, tmp_path):
    cfg = _ccfg(steps=4, max_q_backup=True, num_max_q=3, q_norm=False, sigmas=(80.0, 2.2404397589312026, 0.002),
                layer_norm=False,
                grad_norm=0.0)
    tr = CPQL(tiny_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    s = tr.fit()
    assert s["steps"] == 4
    rows = list(csv.DictReader(open(tmp_path / "train.csv")))
    assert all(np.isfinite(float(r["critic_loss"])) for r in rows)


def test_atomic_writes_and_logger(tmp_path):
    p = atomic_write_json({"a": float("inf"), "b": np.float32(2.0), "t": torch.tensor([1.0])}, str(tmp_path / "x.json"))
    assert json.load(open(p)) == {"a": None, "b": 2.0, "t": [1.0]}
    atomic_torch_save({"w": torch.ones(2)}, str(tmp_path / "c.pt"))
    assert torch.equal(torch.load(str(tmp_path / "c.pt"))["w"], torch.ones(2))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"w": Boom()}, str(tmp_path / "c.pt"))
    assert torch.equal(torch.load(str(tmp_path / "c.pt"))["w"], torch.ones(2))  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "x.json"]  # no temp files left
    lg = RunLogger(str(tmp_path / "logs"), tensorboard=False)
    for s in range(1, 6):
        lg.log("train", s, {"loss": s * 0.5})
    lg.truncate_after(3)
    lg.log("train", 4, {"loss": 9.0})
    lg.close()
    rows = list(csv.DictReader(open(tmp_path / "logs" / "train.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[-1]["loss"] == "9.0"
    assert parse_value("1e5", 3) == 100000 and parse_value("false", True) is False and parse_value("0.5", 1.0) == 0.5


def test_cpql_online_smoke_and_resume(tmp_path):
    pytest.importorskip("gymnasium", reason="online CPQL needs gymnasium (the 'rl' extra)")
    cfg = CPQLOnlineConfig(env_id="Pendulum-v1", hidden=16, depth=2, critic_hidden=16, critic_depth=2, steps=40,
                           warmup_steps=20, batch=8, buffer_size=100, eval_episodes=1, log_every=10,
                           checkpoint_every=15, tensorboard=False)
    run = CPQLOnline(cfg, out_dir=str(tmp_path), progress_bar=False, callback=_kill_at(33))
    with pytest.raises(StopTraining):
        run.fit()
    torch.load(os.path.join(str(tmp_path), "checkpoint.pt"), weights_only=True)  # replay buffer, numpy RNG: safe
    resumed = CPQLOnline(cfg, out_dir=str(tmp_path), progress_bar=False)
    assert resumed.try_resume() and resumed.step == 30 and len(resumed.buffer) == 30 and resumed.updates == 10
    s = resumed.fit()
    assert s["steps"] == 40 and len(resumed.buffer) == 40 and np.isfinite(s["final_eval"]["mean"])
    # lr_decay counts env steps (warm-up included, as the official code's epochs): the last update, at step 39
    dec = CPQLOnline(dataclasses.replace(cfg, lr_decay=True, eval_episodes=0), out_dir=str(tmp_path / "decay"),
                     progress_bar=False)
    dec.fit()
    assert dec.optims["actor"].param_groups[0]["lr"] == pytest.approx(3e-4 * 0.5 * (1 + np.cos(np.pi * 39 / 40)))


def test_e2e_cpql_beats_behaviour(demo_ds, tmp_path):
    """CPQL on the embedded Pendulum dataset, fixed seed, 800 steps: return above the behaviour policy's."""
    t = time.perf_counter()
    cfg = CPQLConfig(**dict(DEMO_CPQL, steps=800, eval_episodes=5, checkpoint_every=0, tensorboard=False, seed=0))
    s = CPQL(demo_ds, cfg, out_dir=str(tmp_path), progress_bar=False).fit()
    behaviour = float(np.mean(demo_ds.episode_returns))
    print(f"CPQL e2e: {s['final_eval']['mean']:.1f} vs behaviour {behaviour:.1f} in {time.perf_counter() - t:.0f} s")
    assert s["final_eval"]["mean"] > behaviour + 100


def test_e2e_smoke_qipo(demo_ds, tmp_path):
    """A short QIPO run on the embedded dataset: all three stages, evaluation, summary on disk."""
    cfg = QIPOConfig(**dict(DEMO_QIPO, pretrain_steps=20, q_steps=20, q_support_refresh=20, q_support=2,
                            policy_steps=10, renew_every=10, num_support=4, sample_steps=2, eval_episodes=2,
                            checkpoint_every=0, tensorboard=False))
    s = QIPO(demo_ds, cfg, out_dir=str(tmp_path), progress_bar=False).fit()
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["steps"] == 50 and np.isfinite(summary["final_eval"]["mean"]) and s["final_eval"]["episodes"] == 2


def test_e2e_qipo_beats_behaviour(demo_ds, tmp_path):
    """QIPO with the demo's hyperparameters (about 50 s on one idle core): return above the behaviour policy's."""
    t = time.perf_counter()
    cfg = QIPOConfig(**dict(DEMO_QIPO, eval_episodes=5, checkpoint_every=0, tensorboard=False, seed=0))
    s = QIPO(demo_ds, cfg, out_dir=str(tmp_path), progress_bar=False).fit()
    behaviour = float(np.mean(demo_ds.episode_returns))
    print(f"QIPO e2e: {s['final_eval']['mean']:.1f} vs behaviour {behaviour:.1f} in {time.perf_counter() - t:.0f} s")
    assert s["final_eval"]["mean"] > behaviour + 100
