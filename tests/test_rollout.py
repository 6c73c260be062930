"""The rollout dataset maker (qipo_kernels.data.rollout, `qipo-kernels make-dataset`).

Tiny datasets only: a linear policy (or a tiny freshly saved SB3 agent) in Hopper-v5 with a 15-step
time limit. Every test uses a temporary $MINARI_DATASETS_PATH.
"""
import os

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")
pytest.importorskip("minari")

from qipo_kernels.data import load_minari  # noqa: E402
from qipo_kernels.data.rollout import make_rollout_dataset, rollout_episode  # noqa: E402

ENV = "Hopper-v5"


def linear_policy(obs):
    """A fixed linear map obs [11] -> action [3] (saturates often, so clipping is exercised)."""
    W = np.linspace(-1.0, 1.0, 33).reshape(3, 11)
    return W @ np.asarray(obs)


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(r))
    return r


def small(dataset_id, **kw):
    args = dict(env_id=ENV, agent=linear_policy, num_episodes=3, noise=0.2, seed=1, ref_episodes=2,
                max_episode_steps=15, progress_bar=False)
    args.update(kw)
    return make_rollout_dataset(dataset_id, **args)


def test_dataset_loads_with_reference_scores_and_is_reproducible(root):
    small("test/hop-a-v0")
    d = load_minari("test/hop-a-v0", normalize_obs=False)
    assert d.obs_dim == 11 and d.act_dim == 3
    assert 3 <= len(d) <= 45
    assert d.actions.abs().max() <= 1.0
    assert d.ref_min_score is not None and d.ref_max_score is not None
    assert d.ref_min_score != d.ref_max_score
    # the reference scores are what the random policy and the noiseless agent earn on seeds 10000, 10001
    env = gym.make(ENV, max_episode_steps=15)
    rng = np.random.default_rng(10000)
    rand = [rollout_episode(env, None, s, rng, 0.0)[2].sum() for s in (10000, 10001)]
    good = [rollout_episode(env, linear_policy, s, rng, 0.0)[2].sum() for s in (10000, 10001)]
    assert d.ref_min_score == pytest.approx(np.mean(rand))
    assert d.ref_max_score == pytest.approx(np.mean(good))
    # same arguments -> the same data
    small("test/hop-b-v0")
    e = load_minari("test/hop-b-v0", normalize_obs=False)
    assert np.array_equal(d.actions.numpy(), e.actions.numpy())
    assert np.array_equal(d.obs.numpy(), e.obs.numpy())
    # another seed -> other data
    small("test/hop-c-v0", seed=2)
    f = load_minari("test/hop-c-v0", normalize_obs=False)
    assert f.actions.shape != d.actions.shape or not np.array_equal(d.actions.numpy(), f.actions.numpy())


def test_noise_is_gaussian_in_rescaled_units_and_zero_noise_is_the_agent(root):
    small("test/hop-n0-v0", noise=0.0)
    d = load_minari("test/hop-n0-v0", normalize_obs=False)
    want = np.clip(np.stack([linear_policy(o) for o in d.obs.numpy()]), -1, 1)   # Hopper's Box is [-1, 1]
    np.testing.assert_allclose(d.actions.numpy(), want, atol=1e-5)
    env = gym.make(ENV, max_episode_steps=200)
    o, a, *_ = rollout_episode(env, lambda obs: np.zeros(3), 3, np.random.default_rng(0), 0.3)
    assert a.std() == pytest.approx(0.3, rel=0.15)


def test_existing_dataset_needs_overwrite_and_failed_write_leaves_nothing(root, monkeypatch):
    small("test/hop-x-v0")
    before = load_minari("test/hop-x-v0", normalize_obs=False).actions.clone()
    with pytest.raises(ValueError, match="overwrite"):
        small("test/hop-x-v0", seed=5)
    from minari.dataset._storages import hdf5_storage

    def boom(self, episodes):
        raise KeyboardInterrupt("simulated kill while writing episodes")

    monkeypatch.setattr(hdf5_storage.HDF5Storage, "update_episodes", boom)
    with pytest.raises(KeyboardInterrupt):
        small("test/hop-x-v0", seed=5, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        small("test/hop-new-v0")
    monkeypatch.undo()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    assert not (root / "test" / "hop-new-v0").exists()
    assert not [p for p in os.listdir(root) if p.startswith(".qipo")]
    # the dataset that was there is untouched by the failed overwrite
    assert np.array_equal(load_minari("test/hop-x-v0", normalize_obs=False).actions.numpy(), before.numpy())


def test_bad_arguments_name_the_argument(root):
    with pytest.raises(ValueError, match="noise"):
        small("test/bad-v0", noise=-0.1)
    with pytest.raises(ValueError, match="num_episodes"):
        small("test/bad-v0", num_episodes=0)
    with pytest.raises(ValueError, match="env_id"):
        small("test/bad-v0", env_id="NoSuchEnv-v0")
    with pytest.raises(TypeError, match="agent"):
        small("test/bad-v0", agent=3)
    with pytest.raises(FileNotFoundError, match="agent zip"):
        small("test/bad-v0", agent=str(root / "missing.zip"))
    with pytest.raises(ValueError, match="dataset_id"):
        small("no version")
    assert not (root / "test").exists()


def test_cli_make_dataset_from_an_sb3_zip(root, tmp_path, capsys):
    sb3 = pytest.importorskip("stable_baselines3")
    import torch

    from qipo_kernels.cli import main

    torch.manual_seed(0)
    model = sb3.SAC("MlpPolicy", gym.make(ENV), policy_kwargs=dict(net_arch=[8, 8]), buffer_size=10, device="cpu")
    zpath = str(tmp_path / "tiny_sac.zip")
    model.save(zpath)
    args = ["make-dataset", "--env", ENV, "--agent", zpath, "--id", "test/hop-sac-v0", "--episodes", "2",
            "--noise", "0.1", "--ref-episodes", "1", "--max-episode-steps", "10", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ref_min_score" in out and "behaviour normalised score" in out
    d = load_minari("test/hop-sac-v0")
    assert len(d) > 0 and d.ref_max_score is not None
    assert main(args) == 0  # same arguments: returns at once (idempotent)
    # what made it is kept in the metadata and printed; it is not compared when the dataset is reused: the same
    # arguments on a machine with other versions return the dataset that is there rather than refuse it
    from qipo_kernels.data import rollout
    meta = rollout.existing_params("test/hop-sac-v0")
    assert meta["qipo_made_with"] == rollout.software_stamp()
    assert f"torch {torch.__version__}" in meta["qipo_made_with"] and "mujoco " in meta["qipo_made_with"]
    assert "made with python " in capsys.readouterr().out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout, "software_stamp", lambda: "python 0, torch 0; cpu other")
        mp.setattr(rollout, "rollout_episode", None)   # reuse must not roll anything out
        assert main(args) == 0
    assert rollout.existing_params("test/hop-sac-v0")["qipo_made_with"] == meta["qipo_made_with"]
    # an agent built for another env says so
    with pytest.raises(SystemExit, match="does not fit"):
        main(["make-dataset", "--env", "HalfCheetah-v5", "--agent", zpath, "--id", "test/hc-v0", "--episodes", "1",
              "--max-episode-steps", "5", "--no-progress"])


def test_vecnormalize_agent_and_reference_agent(root, tmp_path):
    """An SB3 agent trained on normalised observations rolls out through its VecNormalize statistics
    (also a pickle written when SB3's env package was the old ``gym``); ref_agent sets ref_max_score;
    the metadata records both, and a dataset made without them is not mistaken for one made with them."""
    sb3 = pytest.importorskip("stable_baselines3")
    import pickle

    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from qipo_kernels.data.rollout import existing_params, load_obs_normalizer, reference_scores

    torch.manual_seed(0)
    env = gym.make(ENV)
    model = sb3.A2C("MlpPolicy", env, policy_kwargs=dict(net_arch=[8]), device="cpu")
    zpath = str(tmp_path / "tiny_a2c.zip")
    model.save(zpath)
    vn = VecNormalize(DummyVecEnv([lambda: gym.make(ENV)]), clip_obs=3.0)
    rng = np.random.default_rng(0)
    vn.obs_rms.mean = rng.normal(size=11)
    vn.obs_rms.var = rng.uniform(0.1, 4.0, size=11)
    vpath = str(tmp_path / "vecnormalize.pkl")
    vn.save(vpath)
    old = tmp_path / "old_gym.pkl"  # the same statistics pickled as if by the old gym package
    blob = pickle.dumps(vn, protocol=2)
    assert b"gymnasium.spaces" in blob
    old.write_bytes(blob.replace(b"cgymnasium.", b"cgym."))
    assert b"cgym.spaces" in old.read_bytes()
    with pytest.raises(ModuleNotFoundError, match="gym"):  # what a plain unpickling of an old file does
        pickle.loads(old.read_bytes())
    o = rng.normal(size=11) * 5
    want = np.clip((o - vn.obs_rms.mean) / np.sqrt(vn.obs_rms.var + vn.epsilon), -3.0, 3.0)
    for p in (vpath, str(old)):
        np.testing.assert_allclose(load_obs_normalizer(p, 11)(o), want, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        load_obs_normalizer(vpath, 5)
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not an SB3 VecNormalize pickle"):
        load_obs_normalizer(str(tmp_path / "junk.pkl"), 11)

    small("test/hop-vn-v0", agent=zpath, noise=0.0, vecnormalize=vpath, ref_agent=linear_policy)
    d = load_minari("test/hop-vn-v0", normalize_obs=False)
    acts = np.stack([model.predict(load_obs_normalizer(vpath, 11)(x), deterministic=True)[0]
                     for x in d.obs.numpy()])
    np.testing.assert_allclose(d.actions.numpy(), np.clip(acts, -1, 1), atol=1e-5)
    ref_env = gym.make(ENV, max_episode_steps=15)
    assert d.ref_max_score == pytest.approx(reference_scores(ref_env, linear_policy, 2)[1])
    meta = existing_params("test/hop-vn-v0")
    assert meta["qipo_vecnormalize"].startswith("vecnormalize.pkl (sha256") and "linear_policy" in meta["qipo_ref_agent"]
    # the same call without vecnormalize is another dataset: refused without overwrite
    with pytest.raises(ValueError, match="already exists"):
        small("test/hop-vn-v0", agent=zpath, noise=0.0)
    with pytest.raises(ValueError, match="vecnormalize applies to an SB3 agent zip"):
        small("test/hop-bad-v0", vecnormalize=vpath)
    with pytest.raises(FileNotFoundError, match="ref_agent zip"):
        small("test/hop-bad-v0", ref_agent=str(tmp_path / "missing.zip"))


def test_sb3_algo_of_tells_a2c_from_ppo(tmp_path):
    """A2C and PPO save the same policy class (common.policies.ActorCriticPolicy); the zip's own fields
    tell them apart (rl-zoo's A2C MuJoCo agents could not be loaded with algo="auto" before)."""
    sb3 = pytest.importorskip("stable_baselines3")
    from qipo_kernels.data.rollout import sb3_algo_of

    env = gym.make("Pendulum-v1")
    for cls, name in ((sb3.A2C, "a2c"), (sb3.PPO, "ppo"), (sb3.SAC, "sac")):
        kw = dict(buffer_size=10) if name == "sac" else {}
        p = str(tmp_path / f"{name}.zip")
        cls("MlpPolicy", env, device="cpu", **kw).save(p)
        assert sb3_algo_of(p) == name


def test_time_feature_agent_sees_obs_and_remaining_time(root, tmp_path):
    """rl-zoo's PPO MuJoCo agents were trained with sb3-contrib's TimeFeatureWrapper (observation plus
    1 - t / max_steps, inside VecNormalize): time_feature=max_steps rebuilds that input each step, restarts
    it every episode, keeps the env's own observations in the dataset, and is recorded in the metadata."""
    sb3 = pytest.importorskip("stable_baselines3")
    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from qipo_kernels.cli import main
    from qipo_kernels.data.rollout import existing_params, load_obs_normalizer, load_sb3_agent

    torch.manual_seed(0)
    space12 = gym.spaces.Box(-np.inf, np.inf, (12,), np.float32)
    env = gym.make(ENV, max_episode_steps=15)

    class With12(gym.ObservationWrapper):
        def __init__(self, e):
            super().__init__(e)
            self.observation_space = space12

        def observation(self, o):
            return np.concatenate([o, [0.0]]).astype(np.float32)

    model = sb3.PPO("MlpPolicy", With12(gym.make(ENV)), policy_kwargs=dict(net_arch=[8]), n_steps=16,
                    batch_size=16, device="cpu")
    zpath = str(tmp_path / "tiny_ppo_tf.zip")
    model.save(zpath)
    vn = VecNormalize(DummyVecEnv([lambda: With12(gym.make(ENV))]), clip_obs=4.0)
    rng = np.random.default_rng(1)
    vn.obs_rms.mean = rng.normal(size=12)
    vn.obs_rms.var = rng.uniform(0.05, 0.5, size=12)  # the time feature's own scale matters
    vpath = str(tmp_path / "vn12.pkl")
    vn.save(vpath)
    with pytest.raises(ValueError, match="(?s)does not fit.*needs time_feature"):  # without the feature: refused, with a hint
        load_sb3_agent(zpath, env, vecnormalize=vpath)
    with pytest.raises(ValueError, match="time_feature"):
        load_sb3_agent(zpath, env, vecnormalize=vpath, time_feature=0)
    pol = load_sb3_agent(zpath, env, vecnormalize=vpath, time_feature=15)
    norm = load_obs_normalizer(vpath, 12)
    for episode in range(2):  # the feature restarts at 1 in every episode
        o, a, *_ = rollout_episode(env, pol, 7, np.random.default_rng(0), 0.0)
        assert o.shape[1] == 11 and len(a) == 15
        want = [model.predict(norm(np.concatenate([o[t], [1 - t / 15]]).astype(np.float32)), deterministic=True)[0]
                for t in range(len(a))]
        np.testing.assert_allclose(a, np.clip(want, -1, 1), atol=1e-6)
        stale = model.predict(norm(np.concatenate([o[3], [1.0]]).astype(np.float32)), deterministic=True)[0]
        assert not np.allclose(a[3], np.clip(stale, -1, 1))  # the feature does reach the agent

    args = ["make-dataset", "--env", ENV, "--agent", zpath, "--vecnormalize", vpath, "--time-feature", "15",
            "--id", "test/hop-tf-v0", "--episodes", "2", "--noise", "0", "--ref-episodes", "1",
            "--max-episode-steps", "15", "--no-progress"]
    assert main(args) == 0
    d = load_minari("test/hop-tf-v0", normalize_obs=False)
    assert d.obs.shape[1] == 11 and existing_params("test/hop-tf-v0")["qipo_time_feature"] == 15
    assert main(args) == 0  # same arguments: returns at once
    with pytest.raises(SystemExit, match="already exists"):  # another time feature is another dataset
        main(args[:7] + ["--time-feature", "1000"] + args[9:])
    with pytest.raises(ValueError, match="time_feature applies to an SB3 agent zip"):
        small("test/hop-bad-v0", time_feature=1000)
