"""Serving: the continuous-batching engine, the OpenAI-compatible HTTP layer, load tests."""
