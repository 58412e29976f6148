"""The one exception tree of StreamML: every error a user can act on derives from StreamMLError."""

from __future__ import annotations


class StreamMLError(Exception):
    """Root of all StreamML errors; the CLI prints these without a traceback."""


class ConfigError(StreamMLError):
    """A setting is missing or invalid."""


class BrokerUnavailableError(StreamMLError):
    """The Kafka broker cannot be reached."""


class SchemaError(StreamMLError):
    """A schema file is missing or invalid, or a record does not fit its schema."""


class DecodeError(StreamMLError):
    """Bytes from a topic could not be decoded into a record."""


class ValidationError(StreamMLError):
    """An input record (event, line, request) is malformed; the message says what and where."""


class TopicMismatchError(StreamMLError):
    """An existing topic differs from its declaration in the catalogue."""


class DependencyUnavailableError(StreamMLError):
    """Something a record needs (a schema from the registry) cannot be had now: the record waits and is
    read again, never dead-lettered for it."""
