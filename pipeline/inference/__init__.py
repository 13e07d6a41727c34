"""Inference: loading a run's weights, generation, speculative decoding, export."""
