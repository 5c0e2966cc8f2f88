"""setuptools hook: ship `mor_jax_lm_eval.pth` so that lm_eval's CLI knows the "mor_jax" model.

Everything else is in pyproject.toml. See mor_jax/evaluate/lm_eval_hook.py.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "mor_jax_lm_eval.pth"


class BuildPyWithPth(build_py):

  def run(self):
    super().run()
    with open(os.path.join(self.build_lib, PTH), "w", encoding="utf-8") as f:
      f.write("import mor_jax.evaluate.lm_eval_hook as _h; _h.install()\n")

  def get_outputs(self, include_bytecode=True):
    return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
