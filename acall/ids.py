"""Identity of tasks and calls: :class:`TaskId` and :class:`CallId` and their string keys.

The key formats are part of the wire format (see ``docs/wire-format.md``):

* ``TaskId.key`` is ``module + "." + func_name`` and is parsed by splitting on the *last*
  dot, so dotted module paths work;
* ``CallId.key`` is ``task_key + ":" + args_id`` and is parsed by splitting on the *last*
  colon.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

from acall._slots import slot_constructor
from acall.errors import InvalidKeyError, short_repr

__all__ = ["NO_ARGS", "CallId", "TaskId", "is_valid_args_id", "make_call_id"]

#: The args_id of a call without arguments.
NO_ARGS: Final = "no_args"

_ARGS_ID_RE: Final = re.compile(r"[0-9a-f]{64}")


def _describe(value: object) -> str:
    # short_repr: a key taken from data may be a deeply nested list, whose plain repr()
    # raises RecursionError.
    return f"{type(value).__name__}: {short_repr(value)}"


def _check_encodable(key: str, what: str) -> None:
    """Refuse a key holding a lone surrogate: keys travel as UTF-8, which cannot hold one."""
    if key.isascii():
        return
    try:
        key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(
            f"malformed {what} {short_repr(key)}: contains a lone surrogate "
            f"{key[exc.start]!r} at index {exc.start} and cannot be encoded as UTF-8"
        ) from None


def is_valid_args_id(args_id: str) -> bool:
    """Return whether *args_id* has the shape the canonical rule produces."""
    return args_id == NO_ARGS or _ARGS_ID_RE.fullmatch(args_id) is not None


@attrs.frozen(slots=True, cache_hash=True)
class TaskId:
    """Identifies a task function by its module and function name."""

    module: str
    func_name: str
    #: The wire key: ``module.func_name``. (Made once: it is read several times for
    #: every invocation, and a task has one TaskId.)
    key: str = attrs.field(init=False, eq=False, repr=False, order=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.module}.{self.func_name}")

    @classmethod
    def from_key(cls, key: str) -> TaskId:
        """Parse ``module.func_name``, splitting on the last dot.

        :raises InvalidKeyError: if *key* is not a string with a non-empty module and name.
        """
        if not isinstance(key, str):
            raise InvalidKeyError(f"task key must be a str, got {_describe(key)}")
        _check_encodable(key, "task key")
        module, dot, func_name = key.rpartition(".")
        if not dot or not module or not func_name:
            raise InvalidKeyError(
                f"malformed task key {key!r:.200}: expected 'module.func_name' "
                "(for example 'myapp.tasks.add')"
            )
        return cls(module, func_name)

    def __str__(self) -> str:
        return self.key


@attrs.frozen(slots=True, cache_hash=True)
class CallId:
    """Identifies one call: a task and the ``args_id`` of its serialized arguments."""

    task_id: TaskId
    args_id: str

    @property
    def key(self) -> str:
        """The wire key: ``task_key:args_id``."""
        return f"{self.task_id.key}:{self.args_id}"

    @classmethod
    def from_key(cls, key: str) -> CallId:
        """Parse ``module.func_name:args_id``, splitting on the last colon.

        :raises InvalidKeyError: if the key is malformed or the args_id is neither
            ``no_args`` nor 64 lowercase hex digits.
        """
        if not isinstance(key, str):
            raise InvalidKeyError(f"call key must be a str, got {_describe(key)}")
        _check_encodable(key, "call key")
        task_key, colon, args_id = key.rpartition(":")
        if not colon:
            raise InvalidKeyError(
                f"malformed call key {key!r:.200}: expected 'module.func_name:args_id'"
            )
        if not is_valid_args_id(args_id):
            raise InvalidKeyError(
                f"malformed call key {key!r:.200}: args_id {args_id!r:.80} is neither "
                "'no_args' nor 64 lowercase hex digits"
            )
        try:
            task_id = TaskId.from_key(task_key)
        except InvalidKeyError as exc:
            raise InvalidKeyError(f"malformed call key {key!r:.200}: {exc}") from None
        return cls(task_id, args_id)

    def __str__(self) -> str:
        return self.key


#: Same as ``CallId(task_id, args_id)``, faster where the C extension is built (the hot
#: path of every call); see :mod:`acall._slots`.
make_call_id: Final = slot_constructor(
    CallId,
    (TaskId("probe", "f"), "0" * 64),
    hidden={"_attrs_cached_hash": None},
    acyclic=(TaskId,),
)
