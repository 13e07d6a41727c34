"""A JAX pipeline that pre-trains, fine-tunes and serves decoder-only language models."""

__version__ = "0.1.0"
