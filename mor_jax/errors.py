"""The error types of mor-jax: one base class, one subclass per area (no imports: the bottom layer).

Every error a user can cause or fix is a `MorJaxError` whose message is one line naming the field, flag or file
and the fix. main.py maps them to exit codes in one place (`main.EXIT_CODES`): a MorJaxError exits with 1.

  MorJaxError
    ConfigError          a config value is invalid (mor_jax.config.validate)
    DataError            the user's data or data config (mor_jax.data)
    CheckpointError      a checkpoint or workdir cannot be used as asked (mor_jax.checkpoint: mismatch, corruption,
                         a failed save, a locked workdir are subclasses there)
    InferenceError       generation cannot run as asked (mor_jax.infer)
    InteropError         a file of another format is missing, malformed or does not fit (mor_jax.interop)
    ChatTemplateError    a chat template is missing, unreadable or refuses a conversation (mor_jax.chat_template)
    NonFiniteLossError   the loss or the gradient norm became NaN/Inf (training stopped, nothing saved after it)
    DeviceMemoryError    the train step does not fit the devices' memory
"""


class MorJaxError(Exception):
  """Something the user can fix; the message (one line) says what and how."""


class ConfigError(MorJaxError, ValueError):
  """A config value is invalid; the message names the field and the fix."""


class DataError(MorJaxError, ValueError):
  """A problem with the user's data or data config; the message names the fix."""


class CheckpointError(MorJaxError, ValueError):
  """A checkpoint cannot be used as asked; the message says why and what to do."""


class InferenceError(MorJaxError, ValueError):
  """Generation cannot run as asked; the message says why and what to do."""


class InteropError(MorJaxError, ValueError):
  """A file is missing, malformed or does not fit the model; the message says what to do."""


class ChatTemplateError(MorJaxError, ValueError):
  """A chat template is missing or unreadable, or refused or failed to render a conversation."""


class NonFiniteLossError(MorJaxError, FloatingPointError):
  """The loss or the gradient norm became NaN or Inf; the message names what, the step and the checkpoint kept."""

  def __init__(self, message: str, *, step: int | None = None):
    super().__init__(message)
    self.step = step


class DeviceMemoryError(MorJaxError, RuntimeError):
  """The train step does not fit the devices' memory. One line naming the bytes needed and available and settings
  that fit; raised before anything is written (nothing fits the budget) or at run time (XLA's RESOURCE_EXHAUSTED,
  after the report is written). No checkpoint is touched either way."""
