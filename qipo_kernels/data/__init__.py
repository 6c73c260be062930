"""Offline datasets (Minari), the embedded no-network dataset, and a replay buffer.

    from qipo_kernels.data import DEMO_DATASET_ID, make_local_dataset, load_minari
    data = load_minari(make_local_dataset(), device="cuda")      # Pendulum-v1, 20k transitions
    batch = data.sample(256)                                     # obs, actions, rewards, next_obs, dones

minari / gymnasium are imported only when a function needs them (pip install 'qipo_kernels[rl]').
"""
from .dataset import OBS_STD_EPS, REWARD_SCALES, DatasetInfo, OfflineDataset, resolve_reward_scale
from .local import PROFILES, episode_profiles, make_local_dataset, pendulum_controller
from .minari_io import DEMO_DATASET_ID, datasets_root, flatten_episodes, load_minari
from .replay import ReplayBuffer

__all__ = [
    "DEMO_DATASET_ID", "make_local_dataset", "load_minari", "OfflineDataset", "DatasetInfo", "ReplayBuffer",
    "flatten_episodes", "datasets_root", "resolve_reward_scale", "REWARD_SCALES", "OBS_STD_EPS",
    "pendulum_controller", "episode_profiles", "PROFILES",
]
