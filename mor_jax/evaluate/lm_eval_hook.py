"""Makes `lm_eval --model mor_jax` work without importing mor_jax first.

lm-eval 0.4 has no plugin discovery for models: only models imported before
the CLI runs are registered. The installed package puts a one-line `.pth`
file in site-packages (see setup.py) that calls `install()` at interpreter
start-up. `install()` only adds an import hook - it imports nothing - and the
hook, when `lm_eval.api.registry` is first imported, registers "mor_jax" as a
lazy entry ("module:Class") that lm-eval resolves like its own models.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "mor_jax"
MODEL_TARGET = "mor_jax.evaluate.harness:MoRJaxLM"


def register(registry_module) -> None:
  registry = registry_module.model_registry
  if MODEL_NAME not in registry:
    registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegistryHook(importlib.abc.MetaPathFinder):
  """Wraps the loader of lm_eval's registry module to register our model right after it runs."""

  def find_spec(self, name, path=None, target=None):
    if name != REGISTRY_MODULE:
      return None
    sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return spec
    exec_module = spec.loader.exec_module

    def exec_and_register(module):
      exec_module(module)
      try:
        register(module)
      except Exception:  # pylint: disable=broad-except  - never break lm_eval itself
        pass

    spec.loader.exec_module = exec_and_register
    return spec


def install() -> None:
  """Adds the hook (or registers at once if lm_eval's registry is already imported)."""
  if REGISTRY_MODULE in sys.modules:
    register(sys.modules[REGISTRY_MODULE])
  elif not any(isinstance(f, _RegistryHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegistryHook())
