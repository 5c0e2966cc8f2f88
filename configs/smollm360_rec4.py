"""middle_cycle R=4. 32 - 2 = 30 middle layers do not divide by 4, so this shape uses 30 layers (1 + 28 + 1; the
reference re-picks layers silently, we do not).

Parameter string options (configs/smollm_family.py): tiny, rec=R, sharing=S, mor=expert|token, kv_sharing, fp32.
Set data.path to a local corpus (e.g. FineWeb-Edu parquet files) to train.
"""

from configs import smollm_family


def get_config(arg: str | None = None):
  return smollm_family.make("360m", strategy="middle_cycle", recursions=4, num_layers=30, tie=False, arg=arg)
