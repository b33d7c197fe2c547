"""acall: an asyncio-native call framework.

Calls (one request to run a task function with concrete arguments) are serialized
concurrently, large argument values are offloaded to content-addressed storage, and
every call is identified by the canonical SHA-256 ``args_id`` shared with pynenc and
rustvello.
"""

from acall.calls import (
    Call,
    ConcurrencyMode,
    LazyCall,
    PreSerializedCall,
    TaskSpec,
)
from acall.codec import (
    OffloadCodec,
    OffloadSettings,
)
from acall.dto import (
    CallDTO,
    DTOCodec,
    ErrorInfo,
    InvocationRecord,
    InvocationStatus,
)
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
    InvalidArgumentsError,
    InvalidKeyError,
    NotSerializedError,
    RemoteTaskError,
    ResultTimeoutError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
    TaskError,
    UnknownTaskError,
    UnsafePayloadError,
)
from acall.hashing import (
    compute_args_id,
)
from acall.ids import (
    CallId,
    TaskId,
)
from acall.serializers import (
    JsonSerializable,
    JsonSerializer,
    PickleSerializer,
    Serializer,
)
from acall.stores import (
    Store,
    open_store,
)

__all__ = [
    "AcallError",
    "ArgumentTypeError",
    "BlobCorruptedError",
    "BlobNotFoundError",
    "BrokerError",
    "BrokerUnavailableError",
    "Call",
    "CallDTO",
    "CallId",
    "CallSerializationError",
    "ConcurrencyMode",
    "ConfigurationError",
    "DTOCodec",
    "DTOValidationError",
    "DeserializationError",
    "ErrorInfo",
    "InvalidArgumentsError",
    "InvalidKeyError",
    "InvocationRecord",
    "InvocationStatus",
    "JsonSerializable",
    "JsonSerializer",
    "LazyCall",
    "NotSerializedError",
    "OffloadCodec",
    "OffloadSettings",
    "PickleSerializer",
    "PreSerializedCall",
    "RemoteTaskError",
    "ResultTimeoutError",
    "SerializationError",
    "Serializer",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "TaskError",
    "TaskId",
    "TaskSpec",
    "UnknownTaskError",
    "UnsafePayloadError",
    "compute_args_id",
    "open_store",
]
