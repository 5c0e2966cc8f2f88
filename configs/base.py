"""mor-jax's defaults as a config file: every field with its default (declared once, in mor_jax/config/schema.py).

  python main.py --config=configs/base.py --workdir=...

Experiment files start from the same defaults (`from mor_jax.config import defaults`) and override what differs.
"""

from mor_jax.config import defaults


def get_config(arg: str | None = None):
  del arg
  return defaults()
