"""QIPO stage 3 (policy improvement): the renewal sampler, the fused weighted loss at the stage-3 shape,
bench/qipo_stage3_diagnosis.py, and time_to_score's final / behaviour evaluations (issue 10)."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from qipo_kernels import backends, data
from qipo_kernels.algos import QIPO
from qipo_kernels.algos.distributed import block_noise, stream_id
from qipo_kernels.policies import FlowPolicy

from conftest import tiny_qipo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import qipo_stage3_diagnosis as D  # noqa: E402
from bench import qipo_critic_budget as CB  # noqa: E402
from bench import time_to_score as T  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HAVE_CPP = not backends.backend_reasons("cpp", "cpu")


@pytest.fixture(scope="module")
def small_ds():
    """400 synthetic transitions, S = 5, A = 3, about a third of the action coordinates at the bound."""
    rng = np.random.default_rng(0)
    n, S, A = 400, 5, 3
    obs = rng.normal(size=(n, S))
    act = np.clip(1.5 * np.tanh(obs[:, :A]) + 0.3 * rng.normal(size=(n, A)), -1, 1)
    rew = -np.sum(obs ** 2, 1)
    nobs = obs + 0.1 * rng.normal(size=obs.shape)
    term, trunc = np.zeros(n), np.zeros(n)
    trunc[199::200] = 1
    return data.OfflineDataset.from_arrays(obs, act, rew, nobs, term, trunc, action_low=-np.ones(A),
                                           action_high=np.ones(A), dataset_id="small", env_id="none")


def _cfg(**kw):
    c = dict(pretrain_steps=4, q_steps=4, q_support_refresh=4, policy_steps=4, num_support=8, renew_every=10,
             renew_chunk=96, sample_steps=3, checkpoint_every=0)
    c.update(kw)
    return tiny_qipo_config(**c)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_renewal_draws_the_evaluation_samplers_samples(small_ds, tmp_path, backend):
    """A renewed support set is policy.sample (ot-eps: the t0 = 0.05 start scale included) on the run's
    block noise, state by state, whatever the chunking: the stage-3 training data are the policy's own
    samples, the ones evaluation draws."""
    tr = QIPO(small_ds, _cfg(backend=backend, renew_chunk=96), out_dir=str(tmp_path), progress_bar=False)
    tr.step = tr.P + tr.Q
    tr._renew_support()
    M, A = tr.cfg.num_support, small_ds.act_dim
    assert tr.ema.path == "ot-eps" and tr.ema.start_noise_scale() < 1.0
    key = (int(tr.cfg.seed), stream_id("renew-support"), tr.step)
    noise = block_noise(key, 0, len(small_ds), (M, A), torch.float32, torch.device("cpu"))
    ref = tr.ema.sample(small_ds.obs, M, noise=noise, backend="torch")
    torch.testing.assert_close(tr.support, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        q = tr.critic.q_min(small_ds.obs.repeat_interleave(M, 0), ref.reshape(-1, A)).reshape(-1, M)
    torch.testing.assert_close(tr.support_q, q, atol=1e-5, rtol=1e-5)
    # the same sample when the start scale were dropped would differ (the check above can fail)
    unscaled = FlowPolicy.sample(tr.ema, small_ds.obs[:4], M, noise=noise[:4] / tr.ema.start_noise_scale(),
                                 backend="torch")
    assert not torch.allclose(unscaled, ref[:4], atol=1e-3)


@pytest.mark.skipif(not HAVE_CPP, reason="the C++ extension is not built here")
@pytest.mark.parametrize("normalize", ["support", "batch"])
def test_stage3_loss_gradient_auto_matches_torch_at_the_stage3_shape(normalize):
    """The energy-weighted loss and its gradient on [B=128, M=64, A=6] with Q-like energies: backend
    "auto" (the C++ kernel) against the plain-PyTorch reference, same t and noise."""
    g = torch.Generator().manual_seed(0)
    B, M, S, A = 128, 64, 17, 6
    pol = FlowPolicy(S, A, hidden=32, depth=2, path="ot-eps")
    obs = torch.randn(B, S, generator=g)
    act = (1.3 * torch.randn(B, M, A, generator=g)).clamp(-1, 1)  # a third saturated, as the walker data
    energy = 20 + 0.3 * torch.randn(B, M, generator=g) + torch.randn(B, 1, generator=g)
    t, z = torch.rand(B, M, generator=g), torch.randn(B, M, A, generator=g)
    out = {}
    for be in ("torch", "auto"):
        pol.zero_grad(set_to_none=True)
        loss = pol.loss(obs, act, energy=energy, beta=3.0, normalize=normalize, t=t, noise=z, backend=be)
        loss.backward()
        out[be] = (loss.detach(), [p.grad.clone() for p in pol.parameters()])
    torch.testing.assert_close(out["auto"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["auto"][1], out["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_stage3_diagnosis_script_on_a_tiny_run(demo_minari_root, tmp_path):
    """bench/qipo_stage3_diagnosis.py end to end on a finished tiny run: the shared (cached) support, its
    statistics, the gradient and sampler checks, every variant's evaluations, the checkpoint comparison."""
    cfg = tiny_qipo_config(path="ot-eps", pretrain_steps=6, q_steps=4, q_support=2, q_support_refresh=4,
                           policy_steps=2, policy_batch=8, renew_every=50, checkpoint_every=0)
    ds = data.load_minari(data.DEMO_DATASET_ID)
    run = tmp_path / "run"
    QIPO(ds, cfg, out_dir=str(run), progress_bar=False).fit()
    ck = str(run / "checkpoint.pt")
    out, cache = str(tmp_path / "diag"), str(tmp_path / "cache" / "support.pt")
    args = ["--ckpt", ck, "--steps", "4", "--eval-at", "2", "4", "--episodes", "1", "--cache", cache,
            "--variants", "uniform", "bc", "keep_data", "uniform_noclip", "--out", out,
            "--compare", ck, "--compare-episodes", "1"]
    D.main(args)
    res = json.load(open(out + ".json"))
    assert os.path.exists(cache) and res["support_cached"] is False
    assert [r["variant"] for r in res["variants"]] == ["uniform", "bc", "keep_data", "uniform_noclip"]
    for r in res["variants"]:
        assert [p["step"] for p in r["points"]] == [2, 4]
        for p in r["points"]:
            assert math.isfinite(p["normalized"]) and 0.0 <= p["drift"]["saturated"] <= 1.0
            assert math.isfinite(p["drift"]["data_fm_loss"]) and math.isfinite(p["loss_last100"])
    st = res["support_stats"]
    for b in ("3", "1"):
        assert 1.0 <= st[f"ess_beta{b}"]["mean"] <= cfg.num_support + 1e-4
    assert 0.0 <= st["saturated_support"] <= 1.0 and 0.0 <= st["saturated_data"] <= 1.0
    assert 0.0 <= st["data_action_rank"]["mean_samples_above"] <= cfg.num_support
    for v in res["grad_check"].values():
        assert v["grad_rel_l2"] < 1e-4
    assert res["sampler_check"]["rms_state_mean_diff_over_se_renewal_vs_torch"] < 3.0
    # the unclamped support is the shared support before its clamp (same noise)
    assert res["variants"][3]["unclamped_support"]["clamped_max_abs_diff_to_shared"] < 1e-5
    (cmp,) = res["compare"]
    assert cmp["ckpt"] == ck and cmp["behaviour"]["episodes"] == 1 and cmp["final_ema"]["episodes"] == 1
    md = open(out + ".md").read()
    assert "| uniform_noclip |" in md and "behaviour model vs final EMA" in md
    # a second call reuses the cached support
    D.main(args[:-3] + ["--variants", "bc", "--skip-checks"])
    assert json.load(open(out + ".json"))["support_cached"] is True


def test_mc_return_to_go_cuts_at_terminations_and_truncations():
    """Backward discounted sums, restarted after a termination and after a truncation; against a loop in
    float64 over explicit episodes."""
    rng = np.random.default_rng(3)
    n, gamma = 17, 0.9
    rew = rng.normal(size=n)
    term, trunc = np.zeros(n), np.zeros(n)
    term[5], trunc[11], trunc[16] = 1, 1, 1
    ds = data.OfflineDataset.from_arrays(rng.normal(size=(n, 2)), np.zeros((n, 1)), rew, rng.normal(size=(n, 2)),
                                         term, trunc, action_low=-np.ones(1), action_high=np.ones(1),
                                         reward_scale="none", dataset_id="rtg", env_id="none")
    want = np.zeros(n)
    for lo, hi in ((0, 6), (6, 12), (12, 17)):
        for i in range(lo, hi):
            want[i] = sum(gamma ** (j - i) * rew[j] for j in range(i, hi))
    got = CB.mc_return_to_go(ds, gamma)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_critic_budget_script_on_two_tiny_runs(demo_minari_root, tmp_path):
    """bench/qipo_critic_budget.py end to end: two finished tiny runs that differ in q_steps, sorted by it,
    each with finite critic statistics (ESS within [1, M]) and three evaluations; .md and .json written."""
    ds = data.load_minari(data.DEMO_DATASET_ID)
    cks = []
    for q in (6, 3):
        cfg = tiny_qipo_config(path="ot-eps", pretrain_steps=4, q_steps=q, q_support=2, q_support_refresh=q,
                               policy_steps=2, policy_batch=8, renew_every=50, checkpoint_every=0)
        run = tmp_path / f"run{q}"
        QIPO(ds, cfg, out_dir=str(run), progress_bar=False).fit()
        cks.append(str(run / "checkpoint.pt"))
    out = str(tmp_path / "cb")
    CB.main(["--ckpts", *cks, "--states", "17", "--support", "6", "--candidates", "3", "--episodes", "1",
             "--out", out])
    res = json.load(open(out + ".json"))
    assert [r["q_steps"] for r in res["rows"]] == [3, 6]
    assert math.isfinite(res["mc_rtg_mean"])
    for r in res["rows"]:
        c = r["critic"]
        assert 1.0 - 1e-4 <= c["ess_mean"] <= 6 + 1e-4 and 0.0 <= c["data_rank_mean_above"] <= 6
        assert all(math.isfinite(v) for v in c.values())
        for k in ("behaviour", "behaviour_argmax", "final"):
            assert r[k]["episodes"] == 1 and math.isfinite(r[k]["normalized"])
    md = open(out + ".md").read()
    assert md.count("\n| 3 |") + md.count("\n| 6 |") == 2 and "argmax of 3" in md
    with pytest.raises(SystemExit, match="--states must be >= 1"):
        CB.main(["--ckpts", cks[0], "--states", "0", "--out", out])


class _FakeDS:
    """time_to_score's view of a dataset: reference scores and the data's episode returns."""
    ref_min_score, ref_max_score = 0.0, 100.0
    episode_returns = np.array([30.0, 34.0])


def _fake_qipo(calls):
    """A QIPO stand-in for time_to_score run: stage 1 ends at step 2 (P), four steps in all, a training-curve
    evaluation at step 3; every step, evaluation (step, episodes) and checkpoint is logged in ``calls``."""

    class FakeQIPO:
        def __init__(self, ds, cfg, out_dir, progress_bar):
            self.cfg, self.P, self.step, self.total_steps = cfg, 2, 0, 4
            self.train_time = self.train_wall_time = 0.0
            self.eval_history, self.callback = [], None

        def save_checkpoint(self):
            calls.append(("checkpoint", self.step))

        def evaluate(self, num_episodes=None):
            n = num_episodes or self.cfg.eval_episodes
            calls.append((self.step, n))
            return {"episodes": n, "normalized_mean": 40.0 + self.step, "normalized_std": 2.0,
                    "returns": [40.0] * n, "normalized_se": 2.0 / (n - 1) ** 0.5}

        def fit(self, resume=False):
            for self.step in range(1, 5):
                calls.append(("step", self.step))
                if self.step == 3:
                    self.eval_history.append({"step": 3, "episodes": self.cfg.eval_episodes, "normalized_mean": 41.0,
                                              "normalized_std": 1.0, "train_time_s": 0.1, "train_wall_s": 0.1})
                self.callback(self, {})

    return FakeQIPO


def test_time_to_score_evaluates_behaviour_and_final_with_final_episodes(tmp_path, monkeypatch):
    """The behaviour-model and final points use --final-episodes, the training curve --episodes (with 5
    episodes on Walker2d the s.e. reached 14 points and a lucky behaviour-model reading of 51.1 stood for
    a model that scores 28.0 ± 2.8 over 50)."""
    calls = []
    monkeypatch.setitem(T.ALGORITHMS, "qipo", (_fake_qipo(calls), *T.ALGORITHMS["qipo"][1:]))
    monkeypatch.setattr(T, "load_minari", lambda _id: _FakeDS())
    T.main(["run", "--algo", "qipo", "--dataset", "d/x/v0", "--episodes", "3", "--final-episodes", "7",
            "--out", str(tmp_path)])
    # ran to its end (fit wrote the checkpoint itself)
    assert [c for c in calls if c[0] != "step"] == [(2, 7), (4, 7)]
    c = json.load(open(tmp_path / "qipo-cpu-quick-x-s0" / "curve.json"))
    assert [(p["tag"], p["episodes"]) for p in c["points"]] == [("behaviour", 7), ("train", 3), ("final", 7)]
    assert c["final_episodes"] == 7 and c["config"]["eval_episodes"] == 3


def test_time_to_score_run_never_starts_over_on_an_existing_run(tmp_path, monkeypatch):
    """The same run command again, without --resume, is refused before anything loads or trains: the trainer
    would have started over in the folder (the finished run's curve.json and checkpoint overwritten, its CSV
    logs mixed with the new run's). A folder with only a checkpoint (a run killed before its first curve
    point) is refused too."""
    calls = []
    monkeypatch.setitem(T.ALGORITHMS, "qipo", (_fake_qipo(calls), *T.ALGORITHMS["qipo"][1:]))
    monkeypatch.setattr(T, "load_minari", lambda _id: _FakeDS())
    args = ["run", "--algo", "qipo", "--dataset", "d/x/v0", "--episodes", "2", "--final-episodes", "2",
            "--out", str(tmp_path)]
    T.main(args)
    run = tmp_path / "qipo-cpu-quick-x-s0"
    before, n = (run / "curve.json").read_bytes(), len(calls)
    monkeypatch.setattr(T, "load_minari", lambda _id: pytest.fail("loaded the dataset"))
    with pytest.raises(SystemExit, match="already holds a run of these arguments"):
        T.main(args)
    assert (run / "curve.json").read_bytes() == before and len(calls) == n
    # an unfinished run (killed after its behaviour point): refused both ways, each saying what to do
    unfinished = {k: v for k, v in json.loads(before).items() if k != "final"}
    (run / "curve.json").write_text(json.dumps(unfinished))
    (run / "run").mkdir()
    (run / "run" / "checkpoint.pt").write_bytes(b"x")
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit, match="another --out or remove"):
            T.main(args + extra)
    (run / "curve.json").unlink()
    with pytest.raises(SystemExit, match="already holds a run"):
        T.main(args)
    assert (run / "run" / "checkpoint.pt").read_bytes() == b"x" and len(calls) == n
    monkeypatch.setattr(T, "load_minari", lambda _id: _FakeDS())
    T.main(args[:-1] + [str(tmp_path / "elsewhere")])   # another --out runs
    assert len(calls) > n


def test_time_to_score_records_what_it_ran_with_and_resumes_only_on_the_same_build(tmp_path, monkeypatch):
    """A curve keeps the software stamp of each leg (start, --resume) and its dataset's; a --resume on a rebuilt
    dataset (other reference scores or data score: made on another machine) is refused before anything runs,
    and the curve is left as it was."""
    from qipo_kernels.data.rollout import software_stamp

    calls = []
    monkeypatch.setitem(T.ALGORITHMS, "qipo", (_fake_qipo(calls), *T.ALGORITHMS["qipo"][1:]))
    monkeypatch.setattr(T, "load_minari", lambda _id: _FakeDS())
    args = ["run", "--algo", "qipo", "--dataset", "d/x/v0", "--episodes", "2", "--final-episodes", "2",
            "--out", str(tmp_path)]
    T.main(args + ["--budget-s", "10"])
    run = tmp_path / "qipo-cpu-quick-x-s0"
    c = json.load(open(run / "curve.json"))
    assert c["made_with"] == [software_stamp()] and c["dataset_made_with"] is None   # no such dataset on disk
    assert c["ref"] == [0.0, 100.0] and c["behaviour_normalized"] == 32.0
    (run / "run").mkdir()
    (run / "run" / "checkpoint.pt").write_bytes(b"")    # the fake trainer writes none
    for field, value in (("ref_max_score", 101.0), ("episode_returns", np.array([30.0, 34.5]))):
        class Rebuilt(_FakeDS):
            pass
        setattr(Rebuilt, field, value)
        monkeypatch.setattr(T, "load_minari", lambda _id: Rebuilt())
        n = len(calls)
        with pytest.raises(SystemExit, match="is not the build the run .* trained on"):
            T.main(args + ["--budget-s", "20", "--resume"])
        assert len(calls) == n and json.load(open(run / "curve.json")) == c
    # on the same build the resume gets past that check to the next one (the fake run ended its schedule)
    monkeypatch.setattr(T, "load_minari", lambda _id: _FakeDS())
    with pytest.raises(SystemExit, match="ended its schedule"):
        T.main(args + ["--budget-s", "20", "--resume"])


def test_time_to_score_stage1_only_stops_after_the_behaviour_model(tmp_path, monkeypatch):
    """--stage1-only: the run stops right after the behaviour model's evaluation (no stage 2 / 3 step, no
    second evaluation of the same model), keeps its checkpoint, and its final point is that evaluation; its
    folder and report label say so; CPQL refuses the flag."""
    calls = []
    monkeypatch.setitem(T.ALGORITHMS, "qipo", (_fake_qipo(calls), *T.ALGORITHMS["qipo"][1:]))
    monkeypatch.setattr(T, "load_minari", lambda _id: _FakeDS())
    T.main(["run", "--algo", "qipo", "--dataset", "d/x/v1", "--stage1-only", "--final-episodes", "7",
            "--out", str(tmp_path)])
    assert calls == [("step", 1), ("step", 2), (2, 7), ("checkpoint", 2)]
    c = json.load(open(tmp_path / "qipo-cpu-quick-stage1-x-s0" / "curve.json"))
    assert c["stage1_only"] is True and [p["tag"] for p in c["points"]] == ["behaviour"]
    assert c["final"] == dict(c["points"][0], tag="final") and c["final"]["normalized"] == 42.0
    assert T._label(c) == "qipo cpu-quick --stage1-only"
    T.main(["report", "--out", str(tmp_path)])
    assert "| qipo cpu-quick --stage1-only | d/x/v1 |" in open(tmp_path / "README.md").read()
    with pytest.raises(SystemExit, match="--stage1-only applies to --algo qipo only"):
        T.main(["run", "--algo", "cpql", "--dataset", "d/x/v1", "--stage1-only", "--out", str(tmp_path)])


def test_time_to_score_keeps_a_checkpoint_when_the_budget_stops_the_run(demo_minari_root, tmp_path, monkeypatch):
    """A run stopped by --budget-s (as every cpu-30min HalfCheetah run is) keeps its checkpoint.pt, so
    qipo_critic_budget / qipo_stage3_diagnosis can read it; before, only finished runs had one."""
    from qipo_kernels.algos.common import read_checkpoint

    T.main(["run", "--algo", "qipo", "--dataset", data.DEMO_DATASET_ID, "--budget-s", "0", "--episodes", "1",
            "--final-episodes", "1", "--eval-every", "0", "--set", "pretrain_batch=16", "--set", "sample_steps=2",
            "--out", str(tmp_path)])
    runs = list(tmp_path.glob("qipo-*-s0-mixed"))
    assert len(runs) == 1
    st = read_checkpoint(str(runs[0] / "run" / "checkpoint.pt"))
    c = json.load(open(runs[0] / "curve.json"))
    assert st["step"] == c["final"]["step"] == 1  # stopped after its first step, not at the end of the schedule


def test_time_to_score_resume_continues_a_finished_run_to_a_larger_budget(demo_minari_root, tmp_path):
    """--resume: a run the budget stopped goes on from its checkpoint (train CPU time and step counted on, not
    restarted) to the end of its schedule; its old final evaluation stays on the curve as "budget_end", the
    resume command is recorded and listed by report; no finished run, or a budget not above the time spent,
    is refused before anything runs, and a run that ended its schedule (not its budget) is refused untouched."""
    args = ["run", "--algo", "qipo", "--dataset", data.DEMO_DATASET_ID, "--episodes", "1", "--final-episodes", "2",
            "--eval-every", "0", "--set", "pretrain_steps=3", "--set", "q_steps=2", "--set", "q_support=2",
            "--set", "policy_steps=2", "--set", "pretrain_batch=16", "--set", "policy_batch=8",
            "--set", "num_support=2", "--set", "sample_steps=2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--resume: no finished run to continue"):
        T.main(args + ["--budget-s", "1000", "--resume"])
    assert not list(tmp_path.iterdir())
    T.main(args + ["--budget-s", "0"])          # stops after its first step
    (run,) = list(tmp_path.glob("qipo-*-s0-mixed"))
    first = json.load(open(run / "curve.json"))
    assert first["final"]["step"] == 1
    with pytest.raises(SystemExit, match="--budget-s must exceed"):
        T.main(args + ["--budget-s", "0", "--resume"])
    T.main(args + ["--budget-s", "1000", "--resume"])
    c = json.load(open(run / "curve.json"))
    assert c["final"]["step"] == 7 and c["budget_s"] == 1000  # 3 + 2 + 2 steps: the schedule's end
    assert c["final"]["cpu_s"] >= first["final"]["cpu_s"]
    tags = [(p["tag"], p["step"]) for p in c["points"]]
    assert tags[0] == ("budget_end", 1) and tags[-1] == ("final", 7)
    assert c["command"] == first["command"] and len(c["resume_commands"]) == 1 and "--resume" in c["resume_commands"][0]
    with pytest.raises(SystemExit, match="ended its schedule"):   # nothing left to continue
        T.main(args + ["--budget-s", "2000", "--resume"])
    assert json.load(open(run / "curve.json")) == c
    (tmp_path / "short").mkdir()   # the shorter run kept beside its continuation (as bench/results/tts does)
    (tmp_path / "short" / "curve.json").write_text(json.dumps(first))
    T.main(["report", "--out", str(tmp_path)])
    text = open(tmp_path / "README.md").read()
    assert c["resume_commands"][0] in text and text.index(c["command"]) < text.index(c["resume_commands"][0])
    assert text.count(c["command"] + "\n") == 1   # both runs start with it: listed once


def test_time_to_score_reeval_replaces_the_final_evaluation_and_keeps_the_old_one(demo_minari_root, tmp_path):
    """reeval: the final checkpoint evaluated again with more episodes becomes the curve's final point (the
    same evaluation, deterministic: twice gives the same numbers); the old final is kept, the command recorded
    and listed by report; a checkpoint of another step, or too few episodes, is refused."""
    T.main(["run", "--algo", "qipo", "--dataset", data.DEMO_DATASET_ID, "--episodes", "1", "--final-episodes", "2",
            "--eval-every", "0", "--set", "pretrain_steps=3", "--set", "q_steps=2", "--set", "q_support=2",
            "--set", "policy_steps=2", "--set", "pretrain_batch=16", "--set", "policy_batch=8",
            "--set", "num_support=2", "--set", "sample_steps=2", "--out", str(tmp_path)])
    (run,) = list(tmp_path.glob("qipo-*-s0-mixed"))
    curve, ck = str(run / "curve.json"), str(run / "run" / "checkpoint.pt")
    before = json.load(open(curve))
    T.main(["reeval", "--curve", curve, "--ckpt", ck, "--episodes", "3"])
    c = json.load(open(curve))
    assert c["final"]["episodes"] == 3 and c["final_at_train_end"]["episodes"] == 2
    (beh,) = [p for p in c["points"] if p["tag"] == "behaviour"]  # QIPO's stage-1 model too
    assert beh["episodes"] == 3 and c["behaviour_at_train_end"]["episodes"] == 2
    assert beh["step"] == [p for p in before["points"] if p["tag"] == "behaviour"][0]["step"]
    assert c["final_at_train_end"]["normalized"] == before["final"]["normalized"]
    assert [p for p in c["points"] if p["tag"] == "final"] == [c["final"]]
    assert c["final"]["step"] == before["final"]["step"] and len(c["points"]) == len(before["points"])
    assert len(c["reeval_commands"]) == 1 and "reeval --curve" in c["reeval_commands"][0]
    T.main(["reeval", "--curve", curve, "--ckpt", ck, "--episodes", "3"])  # again: the original stays the train-end one
    c2 = json.load(open(curve))
    assert c2["final_at_train_end"] == c["final_at_train_end"] and len(c2["reeval_commands"]) == 1
    assert c2["final"] == c["final"]
    T.main(["report", "--out", str(tmp_path)])
    assert "reeval --curve" in (tmp_path / "README.md").read_text()
    with pytest.raises(SystemExit, match="episodes must be >= 2"):
        T.main(["reeval", "--curve", curve, "--ckpt", ck, "--episodes", "1"])
    c["final"]["step"] += 1
    (run / "curve.json").write_text(json.dumps(c))
    with pytest.raises(SystemExit, match="not this run's final checkpoint"):
        T.main(["reeval", "--curve", curve, "--ckpt", ck, "--episodes", "3"])


def test_critic_from_swaps_in_another_runs_target_critic(demo_minari_root, tmp_path):
    """--critic-from (both diagnosis scripts): a CPQL run's target critic (LayerNorm, Mish) replaces the QIPO
    run's own; the stage-3 weights and the argmax evaluation then use its values; a run on another dataset or
    with another reward scale is refused by name."""
    from qipo_kernels.algos import CPQL, CPQLConfig

    ds = data.load_minari(data.DEMO_DATASET_ID)
    qrun, crun = tmp_path / "qipo", tmp_path / "cpql"
    QIPO(ds, tiny_qipo_config(path="ot-eps", pretrain_steps=4, q_steps=3, q_support=2, q_support_refresh=3,
                              policy_steps=2, policy_batch=8, renew_every=50, checkpoint_every=0),
         out_dir=str(qrun), progress_bar=False).fit()
    CPQL(ds, CPQLConfig(hidden=16, depth=2, critic_hidden=24, critic_depth=2, steps=3, batch=16, eval_episodes=0,
                        checkpoint_every=0, tensorboard=False), out_dir=str(crun), progress_bar=False).fit()
    qck, cck = str(qrun / "checkpoint.pt"), str(crun / "checkpoint.pt")
    tr, _ = D.load_trainer(qck, ("behaviour", "critic", "critic_target"), str(tmp_path / "x"), ds)
    src = D.critic_from(tr, cck)
    assert src["algo"] == "cpql" and src["step"] == 3
    want = torch.load(cck, weights_only=False)["modules"]["critic_target"]
    got = tr.critic.state_dict()
    assert tr.critic is tr.critic_target and tr.critic.layer_norm and tr.critic.hidden == 24
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    sup = torch.rand(len(ds), 3, ds.act_dim) * 2 - 1
    q = D.support_q(tr, sup, chunk=7)  # chunks that do not divide N
    ref = tr.critic.q_min(ds.obs.repeat_interleave(3, 0), sup.reshape(-1, ds.act_dim)).reshape(-1, 3)
    torch.testing.assert_close(q, ref)
    out = str(tmp_path / "cb")
    CB.main(["--ckpts", qck, "--critic-from", cck, "--states", "6", "--support", "3", "--candidates", "2",
             "--episodes", "1", "--out", out])
    res = json.load(open(out + ".json"))
    assert res["critic_from"]["algo"] == "cpql" and "target critic of" in open(out + ".md").read()
    # the stage-3 diagnosis: the support cached under the run's own critic is re-scored by the swapped one
    cache, d_out = str(tmp_path / "support.pt"), str(tmp_path / "diag")
    common = ["--ckpt", qck, "--steps", "2", "--eval-at", "2", "--episodes", "1", "--cache", cache, "--skip-checks",
              "--out", d_out]
    D.main(common + ["--variants", "bc"])
    D.main(common + ["--variants", "preset", "keep_data", "--critic-from", cck])
    res = json.load(open(d_out + ".json"))
    assert res["support_cached"] is True and res["critic_from"]["path"] == cck
    assert torch.load(cache, weights_only=False)["critic"] is None  # the cache still holds the run's own scores
    assert "target critic of" in open(d_out + ".md").read()
    # refused: another reward scale (Q on another scale would change what beta means)
    tr2, _ = D.load_trainer(qck, ("behaviour",), str(tmp_path / "y"), ds)
    ck = torch.load(cck, weights_only=False)
    ck["config"]["reward_scale"] = "none"
    bad = str(tmp_path / "bad.pt")
    torch.save(ck, bad)
    with pytest.raises(SystemExit, match="reward_scale='none'"):
        D.critic_from(tr2, bad)


def test_noise_scale_script_on_a_tiny_run(demo_minari_root, tmp_path):
    """bench/qipo_noise_scale.py end to end: behaviour model and final policy at each scale, .md and .json;
    scale 0 is deterministic (the same returns as a second evaluation by hand); bad arguments refused."""
    from bench import qipo_noise_scale as NS

    ds = data.load_minari(data.DEMO_DATASET_ID)
    run = tmp_path / "run"
    QIPO(ds, tiny_qipo_config(path="ot-eps", pretrain_steps=4, q_steps=2, q_support=2, q_support_refresh=2,
                              policy_steps=2, policy_batch=8, renew_every=50, checkpoint_every=0),
         out_dir=str(run), progress_bar=False).fit()
    ck, out = str(run / "checkpoint.pt"), str(tmp_path / "ns")
    NS.main(["--ckpts", ck, "--scales", "1", "0", "--episodes", "2", "--out", out])
    res = json.load(open(out + ".json"))
    (row,) = res["rows"]
    for k in ("behaviour", "final"):
        assert set(row[k]) == {"1.0", "0.0"} and all(math.isfinite(v["normalized"]) for v in row[k].values())
    tr, _ = D.load_trainer(ck, ("behaviour", "ema"), str(tmp_path / "x"), ds)
    tr.cfg.eval_noise_scale, tr.step = 0.0, 10_000  # another evaluation generator seed: same actions at scale 0
    r = tr.evaluate(num_episodes=2, policy=tr.ema)
    assert r["normalized_mean"] == pytest.approx(row["final"]["0.0"]["normalized"], rel=1e-6)
    md = open(out + ".md").read()
    assert "final QIPO, scale 0" in md and "behaviour model, scale 1" in md
    with pytest.raises(SystemExit, match="--scales"):
        NS.main(["--ckpts", ck, "--scales", "-1", "--out", out])
    with pytest.raises(SystemExit, match="no such file"):
        NS.main(["--ckpts", str(tmp_path / "nope.pt"), "--out", out])


@pytest.mark.parametrize("normalize", ["support", "batch"])
def test_sampled_support_estimator_step_is_plain_fm_on_weight_drawn_pairs(small_ds, tmp_path, normalize):
    """support_estimator="sampled": a stage-3 step draws the batch's states, then one support action per
    row with draw_weighted_pairs (the run's generator), and takes plain flow matching on those pairs; the
    step counts policy_batch samples. Replayed here from the same generator state on a copy of the policy."""
    import copy

    from qipo_kernels.reference import draw_weighted_pairs

    cfg = _cfg(support_estimator="sampled", normalize=normalize, beta=5.0, policy_batch=17)
    tr = QIPO(small_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    while tr.step < tr.P + tr.Q + 1:      # through stages 1-2 and the first stage-3 step (renews the support)
        tr.train_step()
        tr.step += 1
    before = copy.deepcopy(tr.policy)
    g = torch.Generator().manual_seed(0)
    g.set_state(tr.gen.get_state())
    metrics, n = tr.train_step()
    idx = torch.randint(0, len(small_ds), (17,), generator=g)
    rows, cols = draw_weighted_pairs(tr.support_q[idx], 5.0, normalize, generator=g)
    sidx = idx[rows]
    want = before.loss(small_ds.obs[sidx], tr.support[sidx, cols], generator=g)
    assert n == 17
    torch.testing.assert_close(metrics["policy_loss"], want.detach())
    # the step changed the policy, and the next step counts the same samples
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), tr.policy.parameters()))
    assert tr.train_step()[1] == 17


def test_sampled_support_estimator_runs_to_the_end_and_is_named_in_errors(small_ds, tmp_path):
    from qipo_kernels.algos import QIPOConfig

    cfg = _cfg(support_estimator="sampled", checkpoint_every=6, policy_steps=6)
    tr = QIPO(small_ds, cfg, out_dir=str(tmp_path / "a"), progress_bar=False)
    summary = tr.fit()
    assert summary["steps"] == tr.P + tr.Q + 6
    assert all(torch.isfinite(p).all() for p in tr.policy.parameters())
    with pytest.raises(ValueError, match="support_estimator must be one of"):
        QIPOConfig(support_estimator="one")
    with pytest.raises(TypeError, match="keep_data_action"):
        QIPOConfig(keep_data_action="yes")


def test_time_to_score_run_names_tell_one_envs_datasets_apart():
    assert T.run_name("qipo", "cpu-30min", ["beta=10"], "qipo/halfcheetah/medium-a2c-v0", 1) == \
        "qipo-cpu-30min-beta_10-halfcheetah-s1-medium-a2c"
    assert T.run_name("cpql", None, [], "qipo/halfcheetah/noisy-sac-v0", 0) == "cpql-halfcheetah-s0-noisy-sac"
    assert T.run_name("qipo", "cpu-quick", [], "d/x/v0", 0) == "qipo-cpu-quick-x-s0"
    assert T.run_name("cpql", None, [], "pendulum", 2) == "cpql-pendulum-s2"
    assert T.run_name("qipo", "cpu-30min", ["path=ot"], "qipo/walker2d/medium-ppo-v0", 2, stage1_only=True) == \
        "qipo-cpu-30min-path_ot-stage1-walker2d-s2-medium-ppo"


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_bound_dequant_reaches_every_flow_matching_step(small_ds, tmp_path, estimator):
    """QIPOConfig.bound_dequant is passed to the stage-1 loss on the data actions and to the stage-3 loss
    on the support (both estimators): each step replays as FlowPolicy.loss(..., bound_dequant) from the
    run's generator; the option is validated by name."""
    import copy

    from qipo_kernels.algos import QIPOConfig
    from qipo_kernels.reference import draw_weighted_pairs

    cfg = _cfg(bound_dequant=0.3, support_estimator=estimator, policy_batch=17)
    tr = QIPO(small_ds, cfg, out_dir=str(tmp_path), progress_bar=False)
    assert float((small_ds.actions.abs() >= 1).float().mean()) > 0.1
    g = torch.Generator().manual_seed(0)

    def replay(pol, idx_n, fn):
        g.set_state(tr.gen.get_state())
        before = copy.deepcopy(pol)
        metrics, _ = tr.train_step()
        idx = torch.randint(0, len(small_ds), (idx_n,), generator=g)
        return metrics, fn(before, idx)

    m, want = replay(tr.behaviour, cfg.pretrain_batch,
                     lambda b, idx: b.loss(small_ds.obs[idx], small_ds.actions[idx], generator=g, bound_dequant=0.3))
    torch.testing.assert_close(m["bc_loss"], want.detach())
    plain = tr.behaviour.loss(small_ds.obs, small_ds.actions, generator=torch.Generator().manual_seed(1))
    deq = tr.behaviour.loss(small_ds.obs, small_ds.actions, generator=torch.Generator().manual_seed(1),
                            bound_dequant=0.3)
    assert not torch.equal(plain, deq)   # the targets did change
    tr.step += 1
    while tr.step < tr.P + tr.Q + 1:      # the rest of stages 1-2 and the first stage-3 step (the renewal)
        tr.train_step()
        tr.step += 1
    assert (tr.support.abs() >= 1).float().mean() > 0.05   # support actions at the bound, clamped there

    def stage3(b, idx):
        if estimator == "sampled":
            rows, cols = draw_weighted_pairs(tr.support_q[idx], cfg.beta, cfg.normalize, generator=g)
            return b.loss(small_ds.obs[idx[rows]], tr.support[idx[rows], cols], generator=g, bound_dequant=0.3)
        return b.loss(small_ds.obs[idx], tr.support[idx], energy=tr.support_q[idx], beta=cfg.beta,
                      normalize=cfg.normalize, generator=g, bound_dequant=0.3)

    m, want = replay(tr.policy, 17, stage3)
    torch.testing.assert_close(m["policy_loss"], want.detach())
    with pytest.raises(ValueError, match="bound_dequant must be >= 0"):
        QIPOConfig(bound_dequant=-1.0)


def test_time_to_score_resume_from_continues_a_run_with_a_longer_last_stage_into_a_new_folder(demo_minari_root,
                                                                                             tmp_path):
    """--resume-from: a finished run continued with a longer stage 3 (QIPO policy_steps) goes into the folder of
    its new arguments; the source run's files are copied, not changed; the new curve keeps the old points (its
    final as "budget_end"), the new set and config, and both commands; other config changes, another seed, a
    schedule no longer than the run's, or --resume with it are refused before anything runs."""
    base = ["run", "--algo", "qipo", "--dataset", data.DEMO_DATASET_ID, "--episodes", "1", "--final-episodes", "2",
            "--eval-every", "0", "--set", "pretrain_steps=3", "--set", "q_steps=2", "--set", "q_support=2",
            "--set", "pretrain_batch=16", "--set", "policy_batch=8", "--set", "num_support=2",
            "--set", "sample_steps=2", "--set", "log_every=1", "--budget-s", "1000"]
    src_out, new_out = tmp_path / "a", tmp_path / "b"
    T.main(base + ["--set", "policy_steps=2", "--out", str(src_out)])
    (src,) = list(src_out.glob("qipo-*-s0-mixed"))
    first = json.load(open(src / "curve.json"))
    assert first["final"]["step"] == 7
    before = {p.name: p.read_bytes() for p in (src / "run").iterdir() if p.is_file()}
    longer = base + ["--set", "policy_steps=5", "--out", str(new_out), "--resume-from", str(src)]
    for extra, msg in ((["--set", "beta=1.0"], "beta 3.0 -> 1.0 cannot change"),
                       (["--seed", "1"], "has seed 0, these arguments 1"),
                       (["--resume"], "pass one of them")):
        with pytest.raises(SystemExit, match=msg):
            T.main(longer + extra)
    with pytest.raises(SystemExit, match="schedule is no longer"):
        T.main(base + ["--set", "policy_steps=2", "--set", "policy_lr=0.001", "--out", str(new_out),
                       "--resume-from", str(src)])
    assert not new_out.exists()
    T.main(longer)
    (run,) = list(new_out.glob("qipo-*-s0-mixed"))
    assert "policy_steps_5" in run.name
    c = json.load(open(run / "curve.json"))
    assert c["final"]["step"] == 10 and c["final"]["cpu_s"] >= first["final"]["cpu_s"]   # 3 + 2 + 5 steps
    tags = [(p["tag"], p["step"]) for p in c["points"]]
    assert ("budget_end", 7) in tags and tags[-1] == ("final", 10)
    assert c["config"]["policy_steps"] == 5 and "policy_steps=5" in c["set"]
    assert c["command"] == first["command"] and "--resume-from" in c["resume_commands"][-1]
    assert {p.name: p.read_bytes() for p in (src / "run").iterdir() if p.is_file()} == before
    assert json.load(open(src / "curve.json")) == first
    steps = [int(r.split(",")[0]) for r in open(run / "run" / "policy.csv").read().split()[1:]]
    assert steps == sorted(set(steps)) and len(steps) == 5   # the copied log goes on, each step once
