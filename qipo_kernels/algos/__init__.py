"""Training algorithms: QIPO (energy-weighted flow matching) and CPQL (consistency policy), offline and online."""
from .common import StopTraining, Trainer, atomic_torch_save, atomic_write_json
from .cpql import (CPQL, CPQL_TASK_DEFAULTS, CPQLConfig, CPQLOnline, CPQLOnlineConfig, cpql_config_for, task_key)
from .qipo import QIPO, QIPOConfig

ALGOS = {"qipo": (QIPO, QIPOConfig), "cpql": (CPQL, CPQLConfig), "cpql-online": (CPQLOnline, CPQLOnlineConfig)}

__all__ = ["QIPO", "QIPOConfig", "CPQL", "CPQLConfig", "CPQLOnline", "CPQLOnlineConfig", "CPQL_TASK_DEFAULTS",
           "cpql_config_for", "task_key", "Trainer", "StopTraining", "atomic_torch_save", "atomic_write_json", "ALGOS"]
