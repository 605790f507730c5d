"""Exceptions raised for bad input.

Every error a user can cause (a broken file, a bad config, a prompt that does not fit) is one
of these, with a message that names the file or value at fault. They subclass ValueError so
callers that only care about "bad input" can catch that.
"""


class Gemma4Error(ValueError):
    """Base class of every input error this package raises."""


class GGUFError(Gemma4Error):
    """A GGUF file cannot be used: not a GGUF, truncated, wrong architecture, bad tensor."""


class ConfigError(Gemma4Error):
    """A run config (YAML or overrides) has an unknown key or an invalid value."""


class InputError(Gemma4Error):
    """Tokens or lengths passed to the model are invalid (out of vocab, too long...)."""
