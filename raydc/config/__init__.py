"""The typed config tree: one dataclass per section, YAML + dotted overrides, validated.

``sections`` holds the job's sections and the loaders, ``engines`` the vLLM engine settings
shared by score / generate / mixed_policy / eval (and those stages' sections), ``tree`` the
generic builder (types, ranges, overrides). Import from here.
"""

from __future__ import annotations

from raydc.config.engines import (
    EvalConfig,
    GenerateConfig,
    MixedPolicyConfig,
    VLLMEngineConfig,
)
from raydc.config.roles import Roles, roles
from raydc.config.sections import (
    DataConfig,
    LoraConfig,
    OnPolicyConfig,
    PhaseConfig,
    RaydcConfig,
    RunConfig,
    ScoreConfig,
    SelectConfig,
    TrainConfig,
    TuneConfig,
    dump_config,
    from_dict,
    load_config,
    phase_tree,
)
from raydc.config.tree import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GenerateConfig",
    "LoraConfig",
    "MixedPolicyConfig",
    "OnPolicyConfig",
    "RaydcConfig",
    "Roles",
    "RunConfig",
    "ScoreConfig",
    "SelectConfig",
    "PhaseConfig",
    "TrainConfig",
    "TuneConfig",
    "VLLMEngineConfig",
    "dump_config",
    "from_dict",
    "load_config",
    "roles",
    "phase_tree",
]
