"""Re-export: checkpoints are owned by `mor_jax.checkpoint` (layout, meta, integrity, restore, lock)."""

from mor_jax.checkpoint import (Checkpointer, CheckpointCorruptError, CheckpointError,  # noqa: F401
                                CheckpointMismatchError, CheckpointSaveError, TrainRestore)

Restored = TrainRestore
