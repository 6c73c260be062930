"""qipo_kernels.evaluation: vector-env evaluation and normalised scores (Pendulum-v1, no MuJoCo needed)."""
import json

import numpy as np
import pytest
from conftest import make_demo_root
import torch

pytest.importorskip("minari")
gym = pytest.importorskip("gymnasium")

from qipo_kernels.data import (  # noqa: E402
    DEMO_DATASET_ID, DatasetInfo, load_minari, pendulum_controller,
)
from qipo_kernels.data.dataset import env_seeds  # noqa: E402
from qipo_kernels.evaluation import D4RL_REF_SCORES, evaluate, normalized_score, reference_scores  # noqa: E402


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return make_demo_root(tmp_path_factory, "minari_eval", 5)


@pytest.fixture
def demo(demo_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(demo_root))
    return load_minari(DEMO_DATASET_ID)


def zero_policy(obs):
    return torch.zeros(obs.shape[0], 1)


def controller_policy(dataset):
    """The scripted controller as a policy on normalised observations, returning [-1, 1] actions."""
    def fn(obs):
        raw = obs * dataset.obs_std + dataset.obs_mean
        return torch.as_tensor(pendulum_controller(raw.numpy()) / 2.0, dtype=torch.float32)
    return fn


def test_evaluate_trivial_policy_gives_finite_scores(demo):
    r = evaluate(zero_policy, demo, num_episodes=3, seeds=(0, 1), num_envs=2)
    assert r["episodes"] == 6 and len(r["returns"]) == 6 and r["seeds"] == [0, 1]
    assert r["lengths"] == [200] * 6 and r["env_id"] == "Pendulum-v1"
    assert np.isfinite(r["mean"]) and np.isfinite(r["std"]) and r["std"] >= 0
    assert np.isclose(r["mean"], np.mean(r["returns"])) and np.isclose(r["std"], np.std(r["returns"]))
    assert len(r["per_seed_mean"]) == 2 and np.isclose(np.mean(r["per_seed_mean"]), r["mean"])
    norm = 100 * (np.asarray(r["returns"]) - demo.ref_min_score) / (demo.ref_max_score - demo.ref_min_score)
    assert np.isclose(r["normalized_mean"], norm.mean()) and np.isclose(r["normalized_std"], norm.std())
    # standard errors of the means: the sample s.d. (ddof 1) over sqrt(n), for every caller to read
    assert np.isclose(r["se"], np.std(r["returns"], ddof=1) / np.sqrt(6))
    assert np.isclose(r["normalized_se"], norm.std(ddof=1) / np.sqrt(6))
    one = evaluate(zero_policy, demo, num_episodes=1, seeds=(0,))
    assert one["se"] is None and one["normalized_se"] is None  # no spread to measure from one episode


def test_standard_error_from_a_population_sd():
    from qipo_kernels.evaluation import standard_error

    x = np.array([3.0, -1.0, 4.0, 1.5, 9.0, 2.0, 6.0])  # 7 values
    assert np.isclose(standard_error(float(x.std()), 7), x.std(ddof=1) / np.sqrt(7))
    assert standard_error(None, 7) is None and standard_error(0.0, 1) is None and standard_error(1.0, 0) is None


def test_controller_scores_near_100_and_beats_doing_nothing(demo):
    good = evaluate(controller_policy(demo), demo, num_episodes=4, seeds=(0,))
    idle = evaluate(zero_policy, demo, num_episodes=4, seeds=(0,))
    assert good["normalized_mean"] > 80 and good["mean"] > idle["mean"] + 300


def test_evaluate_is_deterministic_and_seeds_differ(demo):
    a = evaluate(zero_policy, demo, num_episodes=3, seeds=(5,), num_envs=3)
    b = evaluate(zero_policy, demo, num_episodes=3, seeds=(5,), num_envs=3)
    c = evaluate(zero_policy, demo, num_episodes=3, seeds=(6,), num_envs=3)
    assert a["returns"] == b["returns"] and a["returns"] != c["returns"]


def test_policy_sees_normalised_observations_and_actions_reach_env_units(demo):
    seen = []

    def policy(obs):
        seen.append(obs.clone())
        assert obs.dtype == torch.float32 and obs.shape == (2, 3)
        return torch.full((2, 1), 0.5)

    evaluate(policy, demo, num_episodes=2, seeds=(0,), num_envs=2, max_episode_steps=5)
    raw = torch.cat(seen) * demo.obs_std + demo.obs_mean  # undo the normalisation
    torch.testing.assert_close(raw[:, 0] ** 2 + raw[:, 1] ** 2, torch.ones(len(raw)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(torch.cat(seen)[:, 0] ** 2 + torch.cat(seen)[:, 1] ** 2, torch.ones(len(raw)))


def test_returns_match_a_manual_rollout_across_autoresets(demo):
    """Copy 0 of a 2-copy vector env runs 2 episodes: both equal plain single-env rollouts with the same seeds."""
    steps = 7
    r = evaluate(controller_policy(demo), demo, num_episodes=4, seeds=(3,), num_envs=2, max_episode_steps=steps)
    assert r["lengths"] == [steps] * 4
    env = gym.make("Pendulum-v1", max_episode_steps=steps)
    policy = controller_policy(demo)
    manual = []
    for ep in range(2):
        obs, _ = env.reset(seed=env_seeds(3, 2)[0] if ep == 0 else None)
        total = 0.0
        for _ in range(steps):
            o = demo.normalize(torch.as_tensor(obs[None], dtype=torch.float32))
            obs, rew, term, trunc, _ = env.step(demo.to_env_action(policy(o))[0].astype(np.float32))
            total += rew
        manual.append(total)
    # returns are recorded in completion order: copy 0, copy 1, copy 0, copy 1
    np.testing.assert_allclose([r["returns"][0], r["returns"][2]], manual, rtol=1e-5)


def test_evaluate_with_env_id_only_and_from_a_state_dict(demo):
    r = evaluate(zero_policy, env_id="Pendulum-v1", num_episodes=2, max_episode_steps=10)
    assert r["normalized_mean"] is None and r["lengths"] == [10, 10]
    sd = json.loads(json.dumps(demo.state_dict()))
    a = evaluate(controller_policy(demo), sd, num_episodes=2, max_episode_steps=20)
    b = evaluate(controller_policy(demo), demo, num_episodes=2, max_episode_steps=20)
    assert a["returns"] == b["returns"] and a["normalized_mean"] == b["normalized_mean"]


def test_evaluate_progress_bar(demo, capsys):
    pytest.importorskip("tqdm")
    r = evaluate(zero_policy, demo, num_episodes=2, max_episode_steps=5, progress=True)
    assert r["episodes"] == 2
    assert "eval Pendulum-v1" in capsys.readouterr().err


def test_normalized_score_reference_choice(demo):
    np.testing.assert_allclose(normalized_score([demo.ref_min_score, demo.ref_max_score], demo), [0.0, 100.0])
    lo, hi = D4RL_REF_SCORES["hopper"]
    info = DatasetInfo(np.zeros(11), np.ones(11), -np.ones(3), np.ones(3), dataset_id="hopper-medium-v2",
                       ref_min_score=0.0, ref_max_score=1.0)
    assert reference_scores(info) == (lo, hi)  # D4RL names use D4RL's constants
    np.testing.assert_allclose(normalized_score([lo, hi, (lo + hi) / 2], info), [0, 100, 50])
    minari_info = DatasetInfo(np.zeros(11), np.ones(11), -np.ones(3), np.ones(3),
                              dataset_id="mujoco/hopper/medium-v0", env_id="Hopper-v5",
                              ref_min_score=-10.0, ref_max_score=90.0)
    assert reference_scores(minari_info) == (-10.0, 90.0)  # Minari datasets carry their own
    assert reference_scores(env_id="Walker2d-v5") == D4RL_REF_SCORES["walker2d"]
    assert normalized_score([1.0], env_id="Pendulum-v1") is None


def test_evaluate_bad_input(demo):
    with pytest.raises(ValueError, match="policy_fn"):
        evaluate(lambda o: torch.zeros(o.shape[0], 2), demo, num_episodes=1, max_episode_steps=2)
    with pytest.raises(ValueError, match="policy_fn"):
        evaluate(lambda o: torch.full((o.shape[0], 1), float("nan")), demo, num_episodes=1, max_episode_steps=2)
    with pytest.raises(TypeError, match="policy_fn"):
        evaluate("not callable", demo)
    with pytest.raises(ValueError, match="num_episodes"):
        evaluate(zero_policy, demo, num_episodes=0)
    with pytest.raises(ValueError, match="seeds"):
        evaluate(zero_policy, demo, seeds=())
    with pytest.raises(ValueError, match="seeds"):
        evaluate(zero_policy, demo, seeds=(-1,))
    with pytest.raises(ValueError, match="num_envs"):
        evaluate(zero_policy, demo, num_envs=0)
    with pytest.raises(ValueError, match="max_episode_steps"):
        evaluate(zero_policy, demo, max_episode_steps=0)
    with pytest.raises(ValueError, match="dataset or an env_id"):
        evaluate(zero_policy)
    with pytest.raises(TypeError, match="dataset"):
        evaluate(zero_policy, dataset=[1, 2])
    with pytest.raises(ValueError, match="env_id"):
        evaluate(zero_policy, env_id="NoSuchEnv-v0")
    with pytest.raises(TypeError, match="dtype"):
        evaluate(zero_policy, demo, dtype=torch.int64)
    with pytest.raises(ValueError, match="observations"):
        evaluate(zero_policy, demo, env_id="MountainCarContinuous-v0", num_episodes=1)


def test_make_env_recovers_the_dataset_environment(demo):
    envs = [demo.make_env(num_envs=3, seed=0), demo.make_env(num_envs=3, seed=0), demo.make_env(num_envs=3, seed=1)]
    try:
        assert all(e.num_envs == 3 for e in envs)
        assert envs[0].single_action_space == gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
        first = [e.reset()[0] for e in envs]
        assert first[0].shape == (3, 3)
        np.testing.assert_array_equal(first[0], first[1])  # seeded: the next reset is deterministic
        assert not np.array_equal(first[0], first[2])
        obs, r, term, trunc, _ = envs[0].step(demo.to_env_action(np.zeros((3, 1))).astype(np.float32))
        assert r.shape == (3,)
    finally:
        for e in envs:
            e.close()
    with pytest.raises(ValueError, match="num_envs"):
        demo.make_env(num_envs=0)
