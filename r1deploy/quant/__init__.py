"""Quantised checkpoint formats: DeepSeek's block-scaled FP8."""
