"""Scoring: answers from a scored model, their metrics, attention grounding and the inference-time baselines."""
