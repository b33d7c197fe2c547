"""Every error acall raises, under one root.

Catch :class:`AcallError` to handle anything acall itself reports; catch a branch to
handle one family. Messages say what happened, why, and what to do next, and name the
task, the argument, the field or the reference where one exists.

.. code-block:: text

    AcallError
    ├── ConfigurationError          bad URL, bad setting, unknown backend
    ├── InvalidKeyError             malformed TaskId / CallId key or content reference
    ├── SerializationError          a value could not be encoded
    │   └── CallSerializationError  one or more arguments of a call failed (lists each)
    ├── DeserializationError        stored text could not be decoded
    │   └── UnsafePayloadError      an envelope named something acall refuses to load
    ├── InvalidArgumentsError       arguments do not bind to the task's signature
    ├── ArgumentTypeError           a value does not fit its parameter annotation
    ├── NotSerializedError          identity asked of a call not serialized yet
    ├── DTOValidationError          a DTO / invocation record document is malformed
    ├── StoreError                  data-store failures
    │   ├── BlobNotFoundError       a referenced value is missing from the store
    │   ├── BlobCorruptedError      a stored blob fails its checksum or framing
    │   └── StoreUnavailableError   the backend cannot be reached
    ├── BrokerError                 broker failures
    │   └── BrokerUnavailableError  the broker cannot be reached
    └── TaskError                   task registry and results
        ├── UnknownTaskError        a task key is not registered in this app
        ├── ResultTimeoutError      a result did not arrive in time
        ├── WorkerCrashError        delivered too often without an outcome (workers died)
        └── RemoteTaskError         a task failed with an exception acall could not rebuild

Errors that describe bad *input* also derive from :class:`ValueError`, so code written
against the stdlib conventions keeps working.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence

__all__ = [
    "AcallError",
    "ArgumentTypeError",
    "BlobCorruptedError",
    "BlobNotFoundError",
    "BrokerError",
    "BrokerUnavailableError",
    "CallSerializationError",
    "ConfigurationError",
    "DTOValidationError",
    "DeserializationError",
    "InvalidArgumentsError",
    "InvalidKeyError",
    "NotSerializedError",
    "RemoteTaskError",
    "ResultTimeoutError",
    "SerializationError",
    "StoreError",
    "StoreUnavailableError",
    "TaskError",
    "UnknownTaskError",
    "UnsafePayloadError",
    "WorkerCrashError",
]


class AcallError(Exception):
    """Root of every error raised by acall."""


class ConfigurationError(AcallError, ValueError):
    """A URL, setting or option is invalid; the message names it and the accepted forms."""


class InvalidKeyError(AcallError, ValueError):
    """A TaskId / CallId key or a content reference does not have the required shape."""


class SerializationError(AcallError, ValueError):
    """A value could not be serialized.

    :ivar type_name: qualified name of the offending value's type, when known.
    """

    def __init__(self, message: str, *, type_name: str | None = None) -> None:
        super().__init__(message)
        self.type_name = type_name


class CallSerializationError(SerializationError):
    """One or more arguments of a call failed to serialize.

    Every failing argument is listed, so a caller fixes them all in one go.

    :ivar task_key: the task whose call failed.
    :ivar failures: ``(argument name, error)`` for each failing argument.
    """

    def __init__(self, task_key: str, failures: Sequence[tuple[str, Exception]]) -> None:
        lines = [f"  - argument {name!r}: {err}" for name, err in failures]
        count = len(failures)
        noun = "argument" if count == 1 else "arguments"
        super().__init__(
            f"task {task_key!r}: {count} {noun} could not be serialized:\n" + "\n".join(lines)
        )
        self.task_key = task_key
        self.failures = tuple(failures)


class DeserializationError(AcallError, ValueError):
    """Serialized text could not be turned back into a value."""


class UnsafePayloadError(DeserializationError):
    """An envelope names an object of the wrong kind (or one acall refuses to import).

    Raised instead of calling anything the payload names: data read back is untrusted.
    """


class InvalidArgumentsError(AcallError, TypeError):
    """Arguments do not bind to the task function's signature (missing, unexpected...)."""


class ArgumentTypeError(AcallError, TypeError):
    """A value cannot be converted to or from its parameter's annotation."""


class NotSerializedError(AcallError, RuntimeError):
    """A call's identity was asked for before ``await call.serialize()``."""


class DTOValidationError(AcallError, ValueError):
    """A DTO or invocation record document is malformed.

    :ivar errors: ``(field path, problem)`` pairs, e.g. ``("call.call_id", "missing")``.
    """

    def __init__(self, what: str, errors: Sequence[tuple[str, str]]) -> None:
        detail = "; ".join(f"{path or '<root>'}: {problem}" for path, problem in errors)
        super().__init__(f"invalid {what}: {detail}")
        self.what = what
        self.errors = tuple(errors)


class StoreError(AcallError):
    """A data store operation failed."""


class BlobNotFoundError(StoreError, KeyError):
    """A referenced value is not in the store (expired, deleted or never written).

    :ivar reference: the missing reference (``None`` when rebuilt from a remote error).
    """

    def __init__(self, message: str, *, reference: str | None = None) -> None:
        super().__init__(message)
        self.reference = reference

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message; show it as written.
        return str(self.args[0])


class BlobCorruptedError(StoreError):
    """A stored blob is truncated or fails its checksum; the value is never returned.

    :ivar reference: the bad reference (``None`` when rebuilt from a remote error).
    """

    def __init__(self, message: str, *, reference: str | None = None) -> None:
        super().__init__(message)
        self.reference = reference


class StoreUnavailableError(StoreError, ConnectionError):
    """The data store cannot be reached."""


class BrokerError(AcallError):
    """A broker operation failed."""


class BrokerUnavailableError(BrokerError, ConnectionError):
    """The broker cannot be reached."""


class TaskError(AcallError):
    """Task registry and result errors."""


class UnknownTaskError(TaskError, LookupError):
    """A task key is not registered in this app (is the task's module imported?)."""


class ResultTimeoutError(TaskError, TimeoutError):
    """A result did not arrive within the given timeout; the invocation keeps running."""


class WorkerCrashError(TaskError):
    """An invocation was delivered too many times without an outcome.

    Each delivery's worker died before recording one (out of memory, a segfault, a
    kill): the invocation fails instead of taking down worker after worker.
    """


class RemoteTaskError(TaskError):
    """A task failed with an exception that could not be rebuilt safely here.

    :ivar type_name: the remote exception's qualified type name.
    :ivar remote_message: its ``str()`` on the worker.
    """

    def __init__(self, type_name: str, remote_message: str) -> None:
        super().__init__(f"{type_name}: {remote_message}")
        self.type_name = type_name
        self.remote_message = remote_message


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 120


def short_repr(value: object) -> str:
    """A repr of *value* for an error message: bounded in length and depth.

    Values met in data may be deeply nested lists, whose plain ``repr()`` raises
    ``RecursionError`` (and a huge one would flood the message).
    """
    return _short.repr(value)
