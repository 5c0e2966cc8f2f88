"""The inference error type, `mor_jax.errors.InferenceError` (no JAX import: the generate command's flag checks use it
before loading anything)."""

from mor_jax.errors import InferenceError

__all__ = ["InferenceError"]
