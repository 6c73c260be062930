"""bench/peer_td3bc.py: the TD3+BC peer baseline (its critic target and actor loss against float64 formulas
written out here, its learning on a one-step task, resume, and its runs through bench/time_to_score.py)."""
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import peer_td3bc as P  # noqa: E402
from qipo_kernels.data import OfflineDataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _bandit(n=2000, S=5, A=3, seed=0):
    """One-step episodes: reward -|a - a*(s)|^2 with a*(s) = 0.8 tanh(W s); the data's actions are uniform in
    [-1, 1], so behaviour cloning learns ~0 and only the reward says where a* is."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(A, S))
    obs = rng.normal(size=(n, S))
    best = 0.8 * np.tanh(obs @ W.T)
    act = rng.uniform(-1, 1, size=(n, A))
    rew = -((act - best) ** 2).sum(1)
    ones = np.ones(n)
    ds = OfflineDataset.from_arrays(obs, act, rew, obs, ones, np.zeros(n), action_low=-np.ones(A),
                                    action_high=np.ones(A), reward_scale="none", normalize_obs=False)
    return ds, best


def test_critic_target_matches_the_formula_in_float64():
    torch.manual_seed(0)
    B, S, A = 17, 6, 4
    cfg = P.TD3BCConfig(policy_noise=0.7, noise_clip=0.3, gamma=0.9)
    actor, critic = P.Actor(S, A, 8).double(), P.TwinCritic(S, A, 8).double()
    nobs, rew = torch.randn(B, S, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    done = (torch.rand(B) < 0.3).double()
    noise = torch.randn(B, A, dtype=torch.float64)
    y = P.td3bc_targets(critic, actor, nobs, rew, done, noise, cfg)
    # written out: smoothing noise clipped to +-0.3, the action clipped to [-1, 1], min over the twin heads
    with torch.no_grad():
        h = torch.tanh(actor.net(nobs))
        a = torch.clamp(h + torch.clamp(0.7 * noise, -0.3, 0.3), -1, 1)
        x = torch.cat([nobs, a], 1)
        q = torch.stack([critic.q1(x)[:, 0], critic.q2(x)[:, 0]]).min(0).values
        want = rew + 0.9 * (1 - done) * q
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert not y.requires_grad
    # the clip bounds the smoothing whatever the draw: a huge draw moves an action by exactly noise_clip
    big = P.td3bc_targets(critic, lambda o: torch.zeros(B, A, dtype=torch.float64), nobs, rew, torch.ones(B),
                          torch.full((B, A), 1e6, dtype=torch.float64), cfg)
    torch.testing.assert_close(big, rew)   # done: no bootstrap


def test_actor_loss_value_and_gradient_match_the_formula_in_float64():
    torch.manual_seed(1)
    B, A = 17, 6
    w = torch.randn(A, dtype=torch.float64)
    pi = torch.randn(B, A, dtype=torch.float64, requires_grad=True)
    act = torch.rand(B, A, dtype=torch.float64) * 2 - 1
    loss, lam = P.td3bc_actor_loss(lambda p: p @ w + 0.5, pi, act, alpha=2.5)
    q = pi.detach() @ w + 0.5
    lam_want = 2.5 / q.abs().mean()
    torch.testing.assert_close(lam, lam_want)
    torch.testing.assert_close(loss.detach(), -lam_want * q.mean() + ((pi.detach() - act) ** 2).mean())
    loss.backward()
    # lambda is a constant: d/dpi = -lambda w / B + 2 (pi - a) / (B A)
    grad_want = -lam_want * w.expand(B, A) / B + 2 * (pi.detach() - act) / (B * A)
    torch.testing.assert_close(pi.grad, grad_want, rtol=1e-12, atol=1e-14)


def test_config_errors_name_the_field():
    for kw, name in (({"tau": 0.0}, "tau"), ({"tau": 1.5}, "tau"), ({"policy_freq": 0}, "policy_freq"),
                     ({"lr": -1.0}, "lr"), ({"gamma": 1.2}, "gamma"), ({"alpha": -1.0}, "alpha"),
                     ({"compile": True}, "compile")):
        with pytest.raises((ValueError, TypeError), match=name):
            P.TD3BCConfig(**kw)
    ds, _ = _bandit(n=50)
    with pytest.raises(TypeError, match="TD3BCConfig"):
        P.TD3BC(ds, cfg={"lr": 1e-3})


def test_td3bc_moves_the_policy_from_the_data_mean_towards_the_reward(tmp_path):
    """On the bandit the data's mean action is 0; the critic's reward term must bring the policy's error to
    a*(s) well below plain behaviour cloning's (alpha = 0) on fresh states."""
    ds, _ = _bandit()
    rng = np.random.default_rng(5)
    W = np.random.default_rng(0).normal(size=(3, 5))  # the bandit's own W (seed 0 draws it first)
    test_obs = torch.as_tensor(rng.normal(size=(500, 5)), dtype=torch.float32)
    best = torch.as_tensor(0.8 * np.tanh(test_obs.double().numpy() @ W.T), dtype=torch.float32)
    err = {}
    for alpha in (0.0, 10.0):
        cfg = P.TD3BCConfig(steps=1500, batch=128, hidden=64, lr=1e-3, alpha=alpha, gamma=0.0, eval_every=0,
                            eval_episodes=0, checkpoint_every=0, seed=0)
        tr = P.TD3BC(ds, cfg, out_dir=str(tmp_path / f"a{alpha}"), progress_bar=False)
        tr.fit(resume=False)
        a = tr.policy_fn()(test_obs)
        assert a.shape == (500, 3) and bool(torch.isfinite(a).all()) and float(a.abs().max()) <= 1.0
        err[alpha] = float(((a - best) ** 2).sum(1).mean())
    assert err[10.0] < 0.3 * err[0.0], err


def test_resume_continues_the_same_run(tmp_path):
    ds, _ = _bandit(n=300)
    kw = dict(batch=32, hidden=16, eval_every=0, eval_episodes=0, checkpoint_every=0, seed=3)
    straight = P.TD3BC(ds, P.TD3BCConfig(steps=40, **kw), out_dir=str(tmp_path / "a"), progress_bar=False)
    straight.fit(resume=False)
    first = P.TD3BC(ds, P.TD3BCConfig(steps=25, **kw), out_dir=str(tmp_path / "b"), progress_bar=False)
    first.fit(resume=False)
    second = P.TD3BC(ds, P.TD3BCConfig(steps=40, **kw), out_dir=str(tmp_path / "b"), progress_bar=False)
    second.verbose = False
    second.fit(resume=True)
    assert second.step == 40
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(straight.modules[name].parameters(), second.modules[name].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_time_to_score_runs_the_peer(demo_minari_root, tmp_path):
    from bench import time_to_score as T
    from qipo_kernels.data import DEMO_DATASET_ID

    out = tmp_path / "tts"
    args = ["run", "--algo", "td3bc", "--dataset", DEMO_DATASET_ID, "--set", "steps=60", "--set", "hidden=32",
            "--eval-every", "30", "--episodes", "2", "--final-episodes", "2", "--out", str(out)]
    T.main(args)
    name = T.run_name("td3bc", "cpu-quick", ["steps=60", "hidden=32"], DEMO_DATASET_ID, 0)
    assert name == "td3bc-steps_60-hidden_32-pendulum-s0-mixed"
    c = json.load(open(out / name / "curve.json"))
    assert c["algo"] == "td3bc" and c["config"]["alpha"] == 2.5 and c["final"]["step"] == 60
    assert [p["step"] for p in c["points"] if p["tag"] == "train"] == [30]
    assert len(c["final"]["per_episode"]) == 2 and T._label(c) == "td3bc --set steps=60 --set hidden=32"
    with pytest.raises(SystemExit, match="already holds a run"):
        T.main(args)
    with pytest.raises(SystemExit, match="unknown TD3BCConfig field 'eta'"):
        T.main(["run", "--algo", "td3bc", "--dataset", DEMO_DATASET_ID, "--set", "eta=1", "--out", str(out)])
    # reeval: the final policy from its checkpoint again with more episodes (deterministic for a checkpoint)
    ckpt = out / name / "run" / "checkpoint.pt"
    T.main(["reeval", "--curve", str(out / name / "curve.json"), "--ckpt", str(ckpt), "--episodes", "3"])
    c2 = json.load(open(out / name / "curve.json"))
    assert c2["final"]["episodes"] == 3 and c2["final_at_train_end"]["episodes"] == 2 and c2["final"]["step"] == 60
    assert c2["final"]["per_episode"][:2] == c["final"]["per_episode"]
    wrong = tmp_path / "wrong.json"   # a curve of another algorithm: its checkpoint is refused by name
    wrong.write_text(json.dumps({**c2, "algo": "cpql"}))
    with pytest.raises(SystemExit, match="is a checkpoint of 'td3bc', the curve's run is 'cpql'"):
        T.main(["reeval", "--curve", str(wrong), "--ckpt", str(ckpt), "--episodes", "3"])
    T.main(["report", "--out", str(out)])
    assert "| td3bc --set steps=60 --set hidden=32 | " + DEMO_DATASET_ID in (out / "README.md").read_text()
