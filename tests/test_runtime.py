"""mor_jax.runtime: huge pages (a re-exec with the allocator's settings) only where the CPU backend will run."""

from mor_jax import runtime


def test_huge_page_reexec_is_for_the_cpu_backend_only(monkeypatch):
  assert runtime.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
  assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "cuda,cpu"})
  assert not runtime.cpu_backend_expected({"JAX_PLATFORM_NAME": "tpu"})
  monkeypatch.setattr(runtime, "_importable", lambda name: name == "jax_cuda12_plugin")
  assert not runtime.cpu_backend_expected({})          # a CUDA jaxlib plugin: JAX would pick the GPU
  monkeypatch.setattr(runtime, "_importable", lambda name: False)
  assert runtime.cpu_backend_expected({})
  calls = []
  monkeypatch.setattr(runtime.os, "execve", lambda *a: calls.append(a))
  for env, expect in (({"JAX_PLATFORMS": "cuda"}, 0), ({"JAX_PLATFORMS": "cpu"}, 1)):
    monkeypatch.setattr(runtime.os, "environ", dict(env))
    runtime.use_huge_pages()
    assert len(calls) == expect
