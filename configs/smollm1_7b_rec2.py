"""SmolLM-1.7B middle_cycle R=2 (1 + 11 + 1 unique layers).

Parameter string options (configs/smollm_family.py): tiny, rec=R, sharing=S, mor=expert|token, kv_sharing, fp32.
Set data.path to a local corpus (e.g. FineWeb-Edu parquet files) to train.
"""

from configs import smollm_family


def get_config(arg: str | None = None):
  return smollm_family.make("1.7b", strategy="middle_cycle", recursions=2, num_layers=None, tie=None, arg=arg)
