"""kvpareto: the memory/accuracy Pareto frontier of KV-cache, weight and pruning settings."""

__version__ = "0.1.0"
