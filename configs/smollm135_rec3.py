"""SmolLM-135M middle_cycle R=3 (30 layers -> 28 middle do not divide by 3; uses 32 layers = 1 + 30 + 1).

Parameter string options (configs/smollm_family.py): tiny, rec=R, sharing=S, mor=expert|token, kv_sharing, fp32.
Set data.path to a local corpus (e.g. FineWeb-Edu parquet files) to train.
"""

from configs import smollm_family


def get_config(arg: str | None = None):
  return smollm_family.make("135m", strategy="middle_cycle", recursions=3, num_layers=32, tie=None, arg=arg)
