"""Test setup: 4 simulated CPU devices (set before jax is imported) and the repo root on sys.path."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compilation():
  """XLA without most optimisations compiles the tests' tiny programs several times faster; the compared
  quantities come from the same programs either way. Modules opt in with
  `pytestmark = pytest.mark.usefixtures("fast_compilation")`; the setting is restored afterwards."""
  import jax  # noqa: PLC0415
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
