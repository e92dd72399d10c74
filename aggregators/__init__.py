"""Aggregators: combine the chosen experts' answers into one. Importing this package registers them all."""

from aggregators import logit_fusion, select, synthesize, vote, weighted
from aggregators.base import AGGREGATORS, Aggregation, Aggregator, AggregatorConfig, ExpertAnswer

__all__ = [
    "AGGREGATORS",
    "Aggregation",
    "Aggregator",
    "AggregatorConfig",
    "ExpertAnswer",
    "logit_fusion",
    "select",
    "synthesize",
    "vote",
    "weighted",
]
