"""Test setup: 4 simulated CPU devices (set before jax is imported) and the repo root on sys.path."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
