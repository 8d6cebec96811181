"""The project's own exception types, one per failure family.

Daemons catch these at their boundaries: a `WireDecodeError` from a peer is answered with an
Error message and counted, a `ConfigError` stops start-up with a message naming the key.
"""


class TetherError(Exception):
    """Base class for every error tether raises on purpose."""


class WireDecodeError(TetherError):
    """Bytes from the wire could not be decoded into a valid record.

    The message names the offending field (as a `$.path`) where one is known. This is the only
    exception `tether.common.wire.decode` raises, whatever the input bytes.
    """


class ConfigError(TetherError):
    """A configuration file or override is invalid; the message names the key."""


class TaskDataError(TetherError):
    """A task's data source is malformed; the message names the file and line."""
