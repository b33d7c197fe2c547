"""acall: an asyncio-native call framework.

Calls (one request to run a task function with concrete arguments) are serialized
concurrently, large argument values are offloaded to content-addressed storage, and
every call is identified by the canonical SHA-256 ``args_id`` shared with pynenc and
rustvello.
"""

from acall.dto import CallDTO, DTOCodec, ErrorInfo, InvocationRecord, InvocationStatus
from acall.errors import (
    AcallError,
    ArgumentTypeError,
    BlobCorruptedError,
    BlobNotFoundError,
    BrokerError,
    BrokerUnavailableError,
    CallSerializationError,
    ConfigurationError,
    DeserializationError,
    DTOValidationError,
    InvalidKeyError,
    RemoteTaskError,
    ResultTimeoutError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
    TaskError,
    UnknownTaskError,
    UnsafePayloadError,
)
from acall.hashing import compute_args_id
from acall.ids import CallId, TaskId
from acall.serializers import JsonSerializable, JsonSerializer, PickleSerializer, Serializer

__all__ = [
    "AcallError",
    "ArgumentTypeError",
    "BlobCorruptedError",
    "BlobNotFoundError",
    "BrokerError",
    "BrokerUnavailableError",
    "CallDTO",
    "CallId",
    "CallSerializationError",
    "ConfigurationError",
    "DTOCodec",
    "DTOValidationError",
    "DeserializationError",
    "ErrorInfo",
    "InvalidKeyError",
    "InvocationRecord",
    "InvocationStatus",
    "JsonSerializable",
    "JsonSerializer",
    "PickleSerializer",
    "RemoteTaskError",
    "ResultTimeoutError",
    "SerializationError",
    "Serializer",
    "StoreError",
    "StoreUnavailableError",
    "TaskError",
    "TaskId",
    "UnknownTaskError",
    "UnsafePayloadError",
    "compute_args_id",
]
