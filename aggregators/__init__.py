"""Aggregators: combine the chosen experts' answers into one. Importing this package registers them all."""

from aggregators import select, synthesize, vote
from aggregators.base import AGGREGATORS, Aggregation, Aggregator, AggregatorConfig, ExpertAnswer

__all__ = [
    "AGGREGATORS",
    "Aggregation",
    "Aggregator",
    "AggregatorConfig",
    "ExpertAnswer",
    "select",
    "synthesize",
    "vote",
]
