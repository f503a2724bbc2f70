"""Configuration errors: one line, naming the offending key or file."""


class ConfigError(ValueError):
    """A config file, key or value that cannot be used. The message names the culprit."""
