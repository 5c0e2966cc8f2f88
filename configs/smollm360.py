"""vanilla (untied, as the reference counts it).

Parameter string options (configs/smollm_family.py): tiny, rec=R, sharing=S, mor=expert|token, kv_sharing, fp32.
Set data.path to a local corpus (e.g. FineWeb-Edu parquet files) to train.
"""

from configs import smollm_family


def get_config(arg: str | None = None):
  return smollm_family.make("360m", strategy="none", recursions=1, num_layers=None, tie=False, arg=arg)
