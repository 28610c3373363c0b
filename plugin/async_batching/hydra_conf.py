"""Registers the config dataclasses in Hydra's ConfigStore, so ``conf/`` YAML and overrides are type-checked.

``generate_schema`` is the root of ``conf/config.yaml``, ``evaluate_schema`` of ``conf/evaluate.yaml``;
``<group>/schema`` is what each group's YAML options extend, so they stay typed when another Hydra app pulls our
groups in (``hydra.searchpath=[pkg://async_batching.conf]``).
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from .config import BatcherConfig
from .job_config import (DataConfig, EvalConfig, EvaluateConfig, GenerateConfig, ModelConfig, SamplingConfig,
                         TrainerConfig, WriterConfig)

GROUP_SCHEMAS = {
    "model": ModelConfig,
    "batcher": BatcherConfig,
    "sampling": SamplingConfig,
    "data": DataConfig,
    "trainer": TrainerConfig,
    "writer": WriterConfig,
}
EVAL_GROUP_SCHEMAS = {"eval": EvalConfig}  # the evaluate job's own group (it shares model, batcher, sampling, trainer)


def register_configs() -> ConfigStore:
    """Store the schemas (idempotent); call before composing a config that uses our groups."""
    cs = ConfigStore.instance()
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    for group, node in {**GROUP_SCHEMAS, **EVAL_GROUP_SCHEMAS}.items():
        cs.store(group=group, name="schema", node=node)
    return cs


register_configs()

__all__ = ["register_configs", "GROUP_SCHEMAS", "EVAL_GROUP_SCHEMAS"]
