"""acall: an asyncio-native call framework.

Calls (one request to run a task function with concrete arguments) are serialized
concurrently, large argument values are offloaded to content-addressed storage, and
every call is identified by the canonical SHA-256 ``args_id`` shared with pynenc and
rustvello.
"""

from acall.brokers import (
    Broker,
    open_broker,
)
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
    WorkerCrashError,
)
from acall.hashing import (
    compute_args_id,
)
from acall.ids import (
    CallId,
    TaskId,
)
from acall.lifecycle import (
    BlobCollection,
    BlobCollector,
)
from acall.results import (
    InvocationHandle,
    ResultFuture,
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
from acall.tasks import (
    App,
    RetryPolicy,
    Task,
    TaskOptions,
)
from acall.worker import (
    InvocationContext,
    Worker,
    current_invocation,
)

__all__ = [
    "AcallError",
    "App",
    "ArgumentTypeError",
    "BlobCollection",
    "BlobCollector",
    "BlobCorruptedError",
    "BlobNotFoundError",
    "Broker",
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
    "InvocationContext",
    "InvocationHandle",
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
    "ResultFuture",
    "ResultTimeoutError",
    "RetryPolicy",
    "SerializationError",
    "Serializer",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "Task",
    "TaskError",
    "TaskId",
    "TaskOptions",
    "TaskSpec",
    "UnknownTaskError",
    "UnsafePayloadError",
    "Worker",
    "WorkerCrashError",
    "compute_args_id",
    "current_invocation",
    "open_broker",
    "open_store",
]
