"""qipo_kernels.data: Minari flattening and loading, the embedded dataset, OfflineDataset, ReplayBuffer.

Every test uses a temporary $MINARI_DATASETS_PATH (minari reads it at call time).
"""
import json
import os

import numpy as np
import pytest
from conftest import make_demo_root
import torch

minari = pytest.importorskip("minari")
gym = pytest.importorskip("gymnasium")

from minari import EpisodeData  # noqa: E402
from minari.data_collector import EpisodeBuffer  # noqa: E402

from qipo_kernels.data import (  # noqa: E402
    DEMO_DATASET_ID, OBS_STD_EPS, DatasetInfo, OfflineDataset, ReplayBuffer, episode_profiles, flatten_episodes,
    load_minari, make_local_dataset, pendulum_controller, resolve_reward_scale,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A datasets directory holding a 10-episode demo dataset, shared by the module's tests."""
    return make_demo_root(tmp_path_factory, "minari_demo", 10)


@pytest.fixture
def demo(demo_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(demo_root))
    return load_minari(DEMO_DATASET_ID)


@pytest.fixture
def empty_root(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def _episode(i, obs, actions, rewards, term, trunc):
    return EpisodeData(id=i, observations=obs, actions=np.asarray(actions), rewards=np.asarray(rewards, float),
                       terminations=np.asarray(term), truncations=np.asarray(trunc), infos={})


# ---------------------------------------------------------------- flattening
def test_flatten_uses_t_plus_one_observations_and_keeps_truncated_next_state():
    # episode 0 terminates after 3 steps; episode 1 is truncated after 2 steps with a real next state
    o0 = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    o1 = 100 + np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    eps = [_episode(0, o0, [[0.1], [0.2], [0.3]], [1, 2, 3], [0, 0, 1], [0, 0, 0]),
           _episode(1, o1, [[0.4], [0.5]], [10, 20], [0, 0], [0, 1])]
    f = flatten_episodes(eps)
    np.testing.assert_array_equal(f["obs"], np.concatenate([o0[:-1], o1[:-1]]))
    np.testing.assert_array_equal(f["next_obs"], np.concatenate([o0[1:], o1[1:]]))
    # the truncated transition's next state is the stored last observation, not a reset state
    np.testing.assert_array_equal(f["next_obs"][-1], o1[-1])
    np.testing.assert_array_equal(f["terminations"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(f["truncations"], [0, 0, 0, 0, 1])
    np.testing.assert_allclose(f["actions"][:, 0], [0.1, 0.2, 0.3, 0.4, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(f["rewards"], [1, 2, 3, 10, 20])
    np.testing.assert_array_equal(f["episode_returns"], [6, 30])
    np.testing.assert_array_equal(f["episode_lengths"], [3, 2])


def test_flatten_dict_observations_in_sorted_key_order():
    t = 3
    obs = {"b": np.full((t + 1, 2), 2.0), "a": np.full((t + 1,), 1.0),
           "c": {"y": np.full((t + 1, 1), 4.0), "x": np.full((t + 1, 1, 2), 3.0)}}
    f = flatten_episodes([_episode(0, obs, np.zeros((t, 1)), np.zeros(t), np.zeros(t), np.zeros(t))])
    assert f["obs"].shape == (t, 6)
    np.testing.assert_array_equal(f["obs"][0], [1, 2, 2, 3, 3, 4])  # a, b, c.x, c.y
    g = flatten_episodes([_episode(0, obs, np.zeros((t, 1)), np.zeros(t), np.zeros(t), np.zeros(t))],
                         obs_keys=("b", "a"))
    np.testing.assert_array_equal(g["obs"][0], [2, 2, 1])
    with pytest.raises(ValueError, match="obs_keys"):
        flatten_episodes([_episode(0, obs, np.zeros((t, 1)), np.zeros(t), np.zeros(t), np.zeros(t))],
                         obs_keys=("missing",))


def test_flatten_rejects_observations_without_the_extra_row():
    with pytest.raises(ValueError, match="T\\+1 rows"):
        flatten_episodes([_episode(0, np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(3), np.zeros(3), np.zeros(3))])
    with pytest.raises(ValueError, match="no transitions"):
        flatten_episodes([])


# ---------------------------------------------------------------- loading real Minari files
def _write_minari(dataset_id, episodes, **kwargs):
    buffers = [EpisodeBuffer(id=i, observations=o, actions=a, rewards=list(r), terminations=list(te),
                             truncations=list(tr), infos={}) for i, (o, a, r, te, tr) in enumerate(episodes)]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id=dataset_id, buffer=buffers, **kwargs)


def test_load_hand_made_minari_dataset(empty_root):
    rng = np.random.default_rng(0)
    o0 = rng.normal(size=(5, 3)).astype(np.float32)
    o1 = rng.normal(size=(3, 3)).astype(np.float32)
    a0 = rng.uniform(-2, 2, size=(4, 1)).astype(np.float32)
    a1 = rng.uniform(-2, 2, size=(2, 1)).astype(np.float32)
    _write_minari("test/hand-v0", [(o0, a0, [1., 2., 3., 4.], [0, 0, 0, 1], [0, 0, 0, 0]),
                                   (o1, a1, [5., 6.], [0, 0], [0, 1])],
                  env="Pendulum-v1", ref_min_score=-1000.0, ref_max_score=-100.0)
    d = load_minari("test/hand-v0", reward_scale="none", normalize_obs=False, dtype=torch.float64)
    assert len(d) == 6 and d.obs_dim == 3 and d.act_dim == 1
    assert d.env_id == "Pendulum-v1" and d.ref_min_score == -1000.0 and d.ref_max_score == -100.0
    np.testing.assert_allclose(d.obs.numpy(), np.concatenate([o0[:-1], o1[:-1]]))
    np.testing.assert_allclose(d.next_obs.numpy(), np.concatenate([o0[1:], o1[1:]]))
    np.testing.assert_allclose(d.actions.numpy(), np.concatenate([a0, a1]) / 2.0)  # Box [-2, 2] -> [-1, 1]
    np.testing.assert_array_equal(d.rewards.numpy(), [1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(d.terminations.numpy(), [0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(d.truncations.numpy(), [0, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(d.action_low, [-2.0]) and np.testing.assert_array_equal(d.action_high, [2.0])
    assert d.obs.dtype == torch.float64


def test_load_dict_observation_dataset(empty_root):
    obs_space = gym.spaces.Dict({"pos": gym.spaces.Box(-5, 5, (2,)), "goal": gym.spaces.Box(-5, 5, (1,))})
    act_space = gym.spaces.Box(np.array([0.0, -1.0], np.float32), np.array([4.0, 1.0], np.float32))
    t = 4
    obs = {"pos": np.arange((t + 1) * 2, dtype=np.float32).reshape(t + 1, 2),
           "goal": np.full((t + 1, 1), 9.0, np.float32)}
    acts = np.tile(np.array([[4.0, 0.0]], np.float32), (t, 1))
    _write_minari("test/dict-v0", [(obs, acts, [0.0] * t, [0] * t, [0] * (t - 1) + [1])],
                  observation_space=obs_space, action_space=act_space)
    d = load_minari("test/dict-v0", normalize_obs=False, reward_scale="none")
    assert d.obs_dim == 3 and d.env_id is None and d.info.obs_keys == ["goal", "pos"]
    np.testing.assert_array_equal(d.obs[0].numpy(), [9.0, 0.0, 1.0])  # goal, then pos (sorted keys)
    np.testing.assert_array_equal(d.next_obs[-1].numpy(), [9.0, 8.0, 9.0])
    np.testing.assert_allclose(d.actions.numpy(), np.tile([[1.0, 0.0]], (t, 1)))
    d2 = load_minari("test/dict-v0", normalize_obs=False, reward_scale="none", obs_keys=["pos"])
    assert d2.obs_dim == 2
    with pytest.raises(ValueError, match="records no environment"):
        d.make_env()


# ---------------------------------------------------------------- scaling and normalisation
def _arrays(n=6, rewards=None):
    rng = np.random.default_rng(1)
    return dict(obs=rng.normal(3, 2, size=(n, 2)), actions=rng.uniform(-2, 2, size=(n, 1)),
                rewards=np.arange(n, dtype=float) if rewards is None else rewards,
                next_obs=rng.normal(3, 2, size=(n, 2)), terminations=np.zeros(n), truncations=np.zeros(n))


@pytest.mark.parametrize("mode,dataset_id,expect", [
    ("none", "x/y-v0", lambda r, ret: r),
    ("antmaze", "x/y-v0", lambda r, ret: r - 1),
    ("cpql-antmaze", "x/y-v0", lambda r, ret: (r - 0.5) * 4),
    ("locomotion", "x/y-v0", lambda r, ret: r * 1000 / (ret.max() - ret.min())),
    (0.25, "x/y-v0", lambda r, ret: r * 0.25),
    ("auto", "mujoco/hopper/medium-v0", lambda r, ret: r * 1000 / (ret.max() - ret.min())),
    ("auto", "D4RL/antmaze/umaze-diverse-v1", lambda r, ret: r - 1),
    ("auto", DEMO_DATASET_ID, lambda r, ret: r),
])
def test_reward_scale_modes(mode, dataset_id, expect):
    a = _arrays()
    returns = np.array([3.0, 12.0])  # two episodes: 0+1+2, 3+4+5
    d = OfflineDataset.from_arrays(**a, action_low=[-2.0], action_high=[2.0], episode_returns=returns,
                                   dataset_id=dataset_id, reward_scale=mode, dtype=torch.float64)
    np.testing.assert_allclose(d.rewards.numpy(), expect(a["rewards"], returns), rtol=1e-12)
    np.testing.assert_allclose(d.info.scale_reward(a["rewards"]), expect(a["rewards"], returns), rtol=1e-12)


def test_reward_scale_resolution_and_errors():
    mode, mult, _ = resolve_reward_scale("auto", "mujoco/halfcheetah/expert-v0", np.array([0.0, 500.0]))
    assert (mode, mult) == ("locomotion", 2.0)
    assert resolve_reward_scale("auto", "hopper-medium-replay-v2", np.array([0.0, 1000.0]))[0] == "locomotion"
    assert resolve_reward_scale("auto", "D4RL/antmaze/large-play-v1")[0] == "antmaze"
    assert resolve_reward_scale("auto", "D4RL/pen/human-v2")[0] == "none"
    assert resolve_reward_scale("auto", "mujoco/pusher/expert-v0")[0] == "none"
    assert resolve_reward_scale("auto", "mujoco/ant/medium-v0", np.array([0.0, 1.0]))[0] == "locomotion"
    with pytest.raises(ValueError, match="reward_scale"):
        resolve_reward_scale("locomotion", "x-v0", np.array([5.0]))
    with pytest.raises(ValueError, match="reward_scale"):
        resolve_reward_scale("locomotion", "x-v0", np.array([5.0, 5.0]))
    with pytest.raises(ValueError, match="reward_scale"):
        resolve_reward_scale("d4rl", "x-v0")
    with pytest.raises(ValueError, match="reward_scale"):
        resolve_reward_scale(float("nan"), "x-v0")
    with pytest.raises(TypeError, match="reward_scale"):
        resolve_reward_scale(True, "x-v0")


def test_observation_normalisation():
    a = _arrays(n=50)
    d = OfflineDataset.from_arrays(**a, action_low=[-2.0], action_high=[2.0], reward_scale="none",
                                   dtype=torch.float64)
    std = a["obs"].std(axis=0)
    np.testing.assert_allclose(d.obs_mean.numpy(), a["obs"].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(d.obs_std.numpy(), std + OBS_STD_EPS, rtol=1e-12)
    np.testing.assert_allclose(d.obs.mean(0).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(d.obs.std(0, unbiased=False).numpy(), std / (std + OBS_STD_EPS), rtol=1e-10)
    # next_obs uses the same statistics; normalize() maps raw env observations (tensor or numpy) alike
    np.testing.assert_allclose(d.next_obs.numpy(), (a["next_obs"] - a["obs"].mean(0)) / (std + OBS_STD_EPS))
    np.testing.assert_allclose(d.normalize(torch.as_tensor(a["obs"])).numpy(), d.obs.numpy(), rtol=1e-12)
    np.testing.assert_allclose(d.normalize(a["obs"]), d.obs.numpy(), rtol=1e-12)
    raw = OfflineDataset.from_arrays(**a, action_low=[-2.0], action_high=[2.0], reward_scale="none",
                                     normalize_obs=False, dtype=torch.float64)
    np.testing.assert_array_equal(raw.obs.numpy(), a["obs"])
    np.testing.assert_array_equal(raw.normalize(a["obs"]), a["obs"])
    with pytest.raises(ValueError, match="obs"):
        d.normalize(torch.zeros(4, 3))


def test_action_scaling_round_trip():
    low, high = np.array([-2.0, 0.0, -np.inf]), np.array([2.0, 10.0, np.inf])
    info = DatasetInfo(np.zeros(2), np.ones(2), low, high)
    u = np.array([[-2.0, 0.0, -7.0], [1.0, 2.5, 3.0], [2.0, 10.0, 0.5]])
    s = info.scale_action(u)
    np.testing.assert_allclose(s[:, :2], [[-1, -1], [0.5, -0.5], [1, 1]])
    np.testing.assert_array_equal(s[:, 2], u[:, 2])  # infinite bounds: left in env units
    np.testing.assert_allclose(info.to_env_action(s), u, rtol=1e-12)
    np.testing.assert_allclose(info.to_env_action(torch.as_tensor(s, dtype=torch.float32)), u, rtol=1e-6, atol=1e-6)
    # actions outside [-1, 1] are clipped into the env's bounds
    np.testing.assert_allclose(info.to_env_action(np.array([[1.5, -3.0, 0.0]]))[0, :2], [2.0, 0.0])
    with pytest.raises(ValueError, match="action"):
        info.to_env_action(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="action_low < action_high"):
        DatasetInfo(np.zeros(2), np.ones(2), [1.0], [1.0])


def test_state_dict_round_trip_through_json(demo):
    sd = json.loads(json.dumps(demo.state_dict()))
    info = DatasetInfo.from_state_dict(sd)
    raw = np.random.default_rng(0).normal(size=(7, 3))
    np.testing.assert_allclose(info.normalize(raw), demo.normalize(raw))
    assert info.dataset_id == DEMO_DATASET_ID and info.env_id == "Pendulum-v1"
    assert info.ref_min_score == demo.ref_min_score and info.ref_max_score == demo.ref_max_score
    assert info.env_spec().id == "Pendulum-v1"
    with pytest.raises(ValueError, match="state"):
        DatasetInfo.from_state_dict({"dataset_id": "x"})


# ---------------------------------------------------------------- sampling
@pytest.mark.parametrize("device", DEVICES)
def test_sample_shapes_device_and_generator_determinism(demo_root, monkeypatch, device):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(demo_root))
    d = load_minari(DEMO_DATASET_ID, device=device)
    for t in (d.obs, d.actions, d.rewards, d.next_obs, d.terminations, d.truncations, d.obs_mean, d.obs_std):
        assert t.device.type == device and t.dtype == torch.float32
    b1 = d.sample(17, generator=torch.Generator().manual_seed(3))
    b2 = d.sample(17, generator=torch.Generator().manual_seed(3))
    b3 = d.sample(17, generator=torch.Generator().manual_seed(4))
    assert set(b1) == {"obs", "actions", "rewards", "next_obs", "dones"}
    assert b1["obs"].shape == (17, 3) and b1["next_obs"].shape == (17, 3)
    assert b1["actions"].shape == (17, 1) and b1["rewards"].shape == (17,) and b1["dones"].shape == (17,)
    assert all(v.device.type == device for v in b1.values())
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k], rtol=0, atol=0)
    assert not torch.equal(b1["obs"], b3["obs"])
    # every sampled row is one transition of the dataset (obs, action, reward, next_obs agree)
    rows = torch.cat([d.obs, d.actions, d.rewards[:, None], d.next_obs], 1)
    brows = torch.cat([b1["obs"], b1["actions"], b1["rewards"][:, None], b1["next_obs"]], 1)
    assert bool((brows[:, None, :] == rows[None]).all(-1).any(-1).all())
    assert float(d.actions.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="batch_size"):
        d.sample(0)
    with pytest.raises(TypeError, match="generator"):
        d.sample(4, generator=3)


def test_demo_dataset_contents(demo):
    assert len(demo) == 10 * 200 and demo.env_id == "Pendulum-v1"
    assert float(demo.terminations.sum()) == 0 and float(demo.truncations.sum()) == 10  # time limit only
    assert demo.reward_scale == "none"
    assert demo.ref_min_score < demo.episode_returns.mean() < demo.ref_max_score
    assert demo.ref_min_score < -900 and demo.ref_max_score > -200


# ---------------------------------------------------------------- errors
def test_missing_dataset_error_says_how_to_get_it(empty_root):
    with pytest.raises(FileNotFoundError, match="minari download mujoco/hopper/medium-v0"):
        load_minari("mujoco/hopper/medium-v0")
    with pytest.raises(FileNotFoundError, match="make_local_dataset"):
        load_minari(DEMO_DATASET_ID)


def test_corrupt_dataset_gives_a_clear_error(empty_root):
    path = empty_root / "test" / "broken-v0" / "data"
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be read"):
        load_minari("test/broken-v0")


def test_bad_arguments_name_the_argument(demo_root, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(demo_root))
    with pytest.raises(TypeError, match="dataset_id"):
        load_minari(3)
    with pytest.raises(ValueError, match="dataset_id"):
        load_minari("not a valid id")
    with pytest.raises(ValueError, match="dataset_id"):
        load_minari("../escape-v0")
    with pytest.raises(ValueError, match="reward_scale"):
        load_minari(DEMO_DATASET_ID, reward_scale="d4rl")
    with pytest.raises(TypeError, match="dtype"):
        load_minari(DEMO_DATASET_ID, dtype=torch.int32)
    with pytest.raises(ValueError, match="device"):
        load_minari(DEMO_DATASET_ID, device="gpu0")
    with pytest.raises(TypeError, match="normalize_obs"):
        load_minari(DEMO_DATASET_ID, normalize_obs="yes")
    with pytest.raises(ValueError, match="obs_keys"):
        load_minari(DEMO_DATASET_ID, obs_keys=["a"])
    with pytest.raises(ValueError, match="num_episodes"):
        make_local_dataset("test/x-v0", num_episodes=0)
    with pytest.raises(ValueError, match="seed"):
        make_local_dataset("test/x-v0", seed=-1)
    with pytest.raises(ValueError, match="dataset_id"):
        make_local_dataset("no-version")
    with pytest.raises(ValueError, match="rewards"):
        OfflineDataset.from_arrays(**{**_arrays(), "rewards": np.zeros(3)}, action_low=[-1.0], action_high=[1.0])
    with pytest.raises(ValueError, match="obs"):
        OfflineDataset.from_arrays(**{**_arrays(), "obs": np.full((6, 2), np.nan)}, action_low=[-1.0],
                                   action_high=[1.0])
    with pytest.raises(ValueError, match="action_low"):
        OfflineDataset.from_arrays(**_arrays(), action_low=[-1.0, -1.0], action_high=[1.0, 1.0])


# ---------------------------------------------------------------- the embedded dataset
def test_make_local_dataset_is_deterministic_and_idempotent(empty_root):
    a = make_local_dataset("test/pend-a-v0", num_episodes=3, seed=7)
    b = make_local_dataset("test/pend-b-v0", num_episodes=3, seed=7)
    c = make_local_dataset("test/pend-c-v0", num_episodes=3, seed=8)
    da, db, dc = (load_minari(x, normalize_obs=False) for x in (a, b, c))
    for k in ("obs", "actions", "rewards", "next_obs", "terminations", "truncations"):
        assert torch.equal(getattr(da, k), getattr(db, k)), k
    assert not torch.equal(da.obs, dc.obs)
    assert (da.ref_min_score, da.ref_max_score) == (dc.ref_min_score, dc.ref_max_score)
    mtime = os.path.getmtime(empty_root / "test" / "pend-a-v0" / "data" / "metadata.json")
    assert make_local_dataset("test/pend-a-v0", num_episodes=3, seed=7) == "test/pend-a-v0"
    assert os.path.getmtime(empty_root / "test" / "pend-a-v0" / "data" / "metadata.json") == mtime
    with pytest.raises(ValueError, match="overwrite"):
        make_local_dataset("test/pend-a-v0", num_episodes=4, seed=7)
    make_local_dataset("test/pend-a-v0", num_episodes=4, seed=7, overwrite=True)
    assert len(load_minari("test/pend-a-v0")) == 4 * 200
    assert set(minari.list_local_datasets()) == {"test/pend-a-v0", "test/pend-b-v0", "test/pend-c-v0"}
    assert not [p for p in os.listdir(empty_root) if p.startswith(".qipo")]  # no temp dirs left


def test_interrupted_build_leaves_no_dataset(empty_root, monkeypatch):
    from minari.dataset._storages import hdf5_storage

    def boom(self, episodes):
        raise KeyboardInterrupt("simulated kill while writing episodes")

    monkeypatch.setattr(hdf5_storage.HDF5Storage, "update_episodes", boom)
    with pytest.raises(KeyboardInterrupt):
        make_local_dataset("test/killed-v0", num_episodes=2)
    assert os.environ["MINARI_DATASETS_PATH"] == str(empty_root)  # restored after the failure
    assert not (empty_root / "test" / "killed-v0").exists()
    assert not [p for p in os.listdir(empty_root) if p.startswith(".qipo")]
    with pytest.raises(FileNotFoundError, match="make_local_dataset|minari download"):
        load_minari("test/killed-v0")
    monkeypatch.undo()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(empty_root))
    # what a SIGKILL leaves behind (a temp dir with a full-looking dataset) is never loaded, and old ones are removed
    stale = empty_root / ".qipo-tmp-dead" / "test" / "killed-v0" / "data"
    stale.mkdir(parents=True)
    os.utime(empty_root / ".qipo-tmp-dead", (1, 1))
    with pytest.raises(FileNotFoundError):
        load_minari("test/killed-v0")
    make_local_dataset("test/killed-v0", num_episodes=2)
    assert len(load_minari("test/killed-v0")) == 400
    assert not (empty_root / ".qipo-tmp-dead").exists()


def test_demo_dataset_is_mixed_quality(demo_root, monkeypatch):
    """Good (expert) episodes clearly beat the random ones, and every profile is present."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(demo_root))
    ds = minari.load_dataset(DEMO_DATASET_ID)
    meta = list(ds.storage.get_episode_metadata(range(ds.total_episodes)))
    profiles = [m["profile"] for m in meta]
    assert profiles == episode_profiles(10, 0)
    assert sorted(set(profiles)) == ["expert", "medium", "poor", "random"]
    returns = {p: [] for p in set(profiles)}
    for ep, p in zip(ds.iterate_episodes(), profiles):
        returns[p].append(ep.rewards.sum())
    mean = {p: float(np.mean(r)) for p, r in returns.items()}
    assert mean["expert"] > -300 > -800 > mean["random"]
    assert mean["expert"] > mean["poor"] and mean["medium"] > mean["random"]


def test_episode_profiles_fractions():
    p = episode_profiles(100, 0)
    assert {k: p.count(k) for k in set(p)} == {"expert": 20, "medium": 30, "poor": 30, "random": 20}
    assert episode_profiles(100, 0) == p and episode_profiles(100, 1) != p
    assert len(episode_profiles(1, 0)) == 1


def test_controller_balances_the_pendulum():
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=123)
    total = 0.0
    for _ in range(200):
        obs, r, *_ = env.step(pendulum_controller(obs).astype(np.float32))
        total += r
    assert abs(np.arctan2(obs[1], obs[0])) < 0.05 and total > -400
    assert pendulum_controller(np.zeros((4, 3)) + [1, 0, 0]).shape == (4, 1)


# ---------------------------------------------------------------- replay buffer
@pytest.mark.parametrize("device", DEVICES)
def test_replay_buffer_add_wrap_and_sample(device):
    buf = ReplayBuffer(obs_dim=3, act_dim=2, capacity=5, device=device)
    buf.add(np.ones(3), np.array([0.5, -0.5]), 1.0, np.ones(3) * 2, False)
    assert len(buf) == 1
    obs = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    buf.add(obs, torch.zeros(6, 2), torch.arange(6.0), obs + 1, torch.tensor([0, 0, 0, 0, 0, 1]))
    assert len(buf) == 5  # capacity; the oldest entries were overwritten
    assert sorted(buf.rewards.cpu().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    b = buf.sample(8, generator=torch.Generator().manual_seed(0))
    assert b["obs"].shape == (8, 3) and b["actions"].shape == (8, 2) and b["dones"].shape == (8,)
    assert all(v.device.type == device for v in b.values())
    torch.testing.assert_close(b["next_obs"], b["obs"] + 1)
    assert torch.equal(b["dones"], (b["rewards"] == 5).float())
    b2 = buf.sample(8, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(b[k], b2[k]) for k in b)
    big = torch.arange(12 * 3, dtype=torch.float32).reshape(12, 3)
    buf.add(big, torch.zeros(12, 2), torch.arange(12.0), big, torch.zeros(12))
    assert sorted(buf.rewards.cpu().tolist()) == [7.0, 8.0, 9.0, 10.0, 11.0]
    state = buf.state_dict()
    other = ReplayBuffer(3, 2, 5, device=device)
    other.load_state_dict(state)
    assert len(other) == 5 and torch.equal(other.obs, buf.obs)


def test_replay_buffer_bad_input():
    buf = ReplayBuffer(obs_dim=3, act_dim=1, capacity=10)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4)
    with pytest.raises(ValueError, match="obs"):
        buf.add(np.ones(4), [0.0], 0.0, np.ones(3), False)
    with pytest.raises(ValueError, match="action"):
        buf.add(np.ones(3), [2.0], 0.0, np.ones(3), False)
    with pytest.raises(ValueError, match="reward"):
        buf.add(np.ones((2, 3)), np.zeros((2, 1)), [0.0], np.ones((2, 3)), [0, 0])
    with pytest.raises(ValueError, match="terminated"):
        buf.add(np.ones(3), [0.0], 0.0, np.ones(3), 0.5)
    with pytest.raises(ValueError, match="reward"):
        buf.add(np.ones(3), [0.0], float("nan"), np.ones(3), False)
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(3, 1, 0)
    assert len(buf) == 0
