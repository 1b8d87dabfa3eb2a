"""Inference with trained LaCy models: loading, cascade generation, cascade partners."""
