"""Structured run configuration: one dataclass per component, loaded from YAML plus overrides.

Every key is documented where it is declared: run.py (run, weights), model.py (model, task),
actor.py, learner.py, broker.py.
"""

from tether.common.config.actor import ActorConfig, EngineConfig, SamplingConfig
from tether.common.config.broker import BrokerConfig
from tether.common.config.learner import LearnerConfig
from tether.common.config.loader import load_config, load_config_or_exit, save_resolved, to_yaml
from tether.common.config.model import ModelConfig, TaskConfig
from tether.common.config.placement import PlacementConfig
from tether.common.config.run import RunConfig, RunSection, WeightSyncConfig

__all__ = [
    "ActorConfig", "BrokerConfig", "EngineConfig", "LearnerConfig", "ModelConfig", "PlacementConfig", "RunConfig",
    "RunSection", "SamplingConfig", "TaskConfig", "WeightSyncConfig", "load_config", "load_config_or_exit",
    "save_resolved",
    "to_yaml",
]
