"""Test setup: 4 simulated CPU devices (set before jax is imported), the repo root on sys.path, and skips that
fail in CI.

In CI (environment variable CI=true; .ci/run installs every optional extra) a skipped test is a failure: a skip
there means a check did not run, e.g. the lm-eval or transformers tests because an extra failed to install. A
skip that depends only on the machine (root for a tmpfs, a file outside the repository) is declared on the test
with `@pytest.mark.environment("why")` and stays a skip.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def _in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "environment(why): the test may skip on machines without `why` (root, a file outside the "
      "repository); in CI such a skip stays a skip, any other skip fails")


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:
    return str(longrepr[2])
  return str(longrepr)


def _fail_skip(report, what: str) -> None:
  """Turns a skip report into a failure that says why (CI installs everything the tests use)."""
  reason = _skip_reason(report)
  report.outcome = "failed"
  report.longrepr = (f"{what} was skipped in CI ({reason}). CI (CI=true) installs requirements-test.txt, so "
                     "every test must run there: fix the install, or mark a skip that depends only on the "
                     "machine with @pytest.mark.environment(\"why\").")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if (_in_ci() and report.skipped and not hasattr(report, "wasxfail")
      and item.get_closest_marker("environment") is None):
    _fail_skip(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
  outcome = yield
  report = outcome.get_result()
  if _in_ci() and report.skipped:          # e.g. a module-level pytest.importorskip("lm_eval")
    _fail_skip(report, collector.nodeid)


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


@pytest.fixture(scope="module")
def shared_compilation_cache(tmp_path_factory):
  """A module whose runs compile the same programs shares them through JAX's persistent cache (a fresh folder per
  module, every program cached). Modules opt in with `pytestmark = pytest.mark.usefixtures(
  "shared_compilation_cache")`; the settings are restored afterwards."""
  import jax  # noqa: PLC0415
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for k, v in old.items():
    jax.config.update(k, v)


@pytest.fixture
def tiny():
  """The shared tiny-config factory (tests/tiny.py): `tiny(strategy, R, mor, **section__field overrides)` returns a
  fresh ConfigDict of mor_jax's defaults with a few-thousand-parameter model."""
  from tiny import tiny_config  # noqa: PLC0415
  return tiny_config
