"""The inference error type (no JAX import: the generate command's flag checks use it before loading anything)."""


class InferenceError(ValueError):
  """Generation cannot run as asked; the message says why and what to do."""
