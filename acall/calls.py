"""Calls: :class:`Call`, :class:`LazyCall` and :class:`PreSerializedCall`.

* :class:`Call` is built client-side from a task and its arguments. ``await
  call.serialize()`` encodes every argument concurrently (small ones inline on the loop,
  large ones in worker threads) and offloads large values, overlapping the store writes
  with the remaining encoding. The result is computed once; concurrent awaits share it.
* :class:`LazyCall` is built worker-side from a :class:`~acall.dto.CallDTO` without
  decoding anything: its identity costs no I/O. ``await call.arguments()`` fetches every
  reference in one batched round trip; ``await call.argument(name)`` loads just one.
* :class:`PreSerializedCall` belongs to a batch whose common arguments were serialized
  (and offloaded) once; only its own arguments are encoded per call.
"""

from __future__ import annotations

import enum
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import anyio

from acall._concurrency import SingleFlight
from acall.codec import THREAD_MIN_CHARS, LoadFailure, OffloadCodec, Prepared, estimate_chars
from acall.dto import CallDTO, make_call_dto
from acall.errors import (
    ArgumentTypeError,
    BlobCorruptedError,
    BlobNotFoundError,
    CallSerializationError,
    DeserializationError,
    InvalidArgumentsError,
    NotSerializedError,
    SerializationError,
)
from acall.hashing import REFERENCE_PREFIX, compute_args_id
from acall.ids import CallId, TaskId, make_call_id
from acall.typed import ParamTypes

__all__ = [
    "Call",
    "ConcurrencyMode",
    "LazyCall",
    "PreSerializedCall",
    "TaskSpec",
]

R = TypeVar("R")

# Exact types whose JSON text is always short (a float or an int of < 1000 digits).
_SCALAR_KINDS: frozenset[type] = frozenset({int, float, bool, type(None)})
# Lists / tuples of scalars up to this length skip the size estimate.
_FEW_ITEMS = 64
_NO_TYPES: Mapping[str, Any] = MappingProxyType({})
#: "No value" in a mapping where None is a value.
_MISSING = object()

# Inline texts shorter than this are decoded on the loop in LazyCall's fast path.
_INLINE_FAST = 4096


class ConcurrencyMode(enum.StrEnum):
    """Which calls count as "the same" for concurrency control (as in pynenc).

    * ``DISABLED`` — no control;
    * ``TASK`` — one per task, whatever the arguments;
    * ``ARGUMENTS`` — one per distinct set of all arguments;
    * ``KEYS`` — one per distinct value of the task's key arguments.
    """

    DISABLED = "disabled"
    TASK = "task"
    ARGUMENTS = "arguments"
    KEYS = "keys"


_EMPTY = inspect.Parameter.empty


class TaskSpec:
    """What calls need to know about a task: identity, signature, types, options.

    :param func: the task function (``None`` for a task known only by id, e.g. a
        worker receiving calls for a function it cannot import).
    :param task_id: defaults to the function's module and qualified name.
    :param key_arguments: argument names forming the key in ``ConcurrencyMode.KEYS``.
    :param disable_offload: argument names never offloaded (``"*"`` for all).
    """

    __slots__ = (
        "_defaults",
        "_name_set",
        "_names",
        "_simple",
        "disable_offload",
        "func",
        "key_arguments",
        "param_types",
        "signature",
        "task_id",
        "typed",
    )

    def __init__(
        self,
        func: Callable[..., Any] | None,
        *,
        task_id: TaskId | None = None,
        key_arguments: Sequence[str] = (),
        disable_offload: Iterable[str] = (),
    ) -> None:
        if task_id is None:
            if func is None:
                raise ValueError("TaskSpec needs a function or a task_id")
            task_id = TaskId(func.__module__, func.__qualname__)
        self.func = func
        self.task_id = task_id
        self.key_arguments = tuple(key_arguments)
        self.disable_offload = frozenset(disable_offload)
        self.signature = inspect.signature(func) if func is not None else None
        self.param_types = ParamTypes(func, task_key=task_id.key) if func is not None else None
        #: :attr:`param_types` when some parameter is typed, else ``None`` (checked per
        #: call: an attribute test is cheaper than ``ParamTypes.__bool__``).
        self.typed = self.param_types if self.param_types else None
        params = list(self.signature.parameters.values()) if self.signature else []
        self._names = tuple(p.name for p in params)
        self._name_set = frozenset(self._names)
        self._defaults = {p.name: p.default for p in params if p.default is not _EMPTY}
        # Plain positional-or-keyword parameters bind with a dict and a zip; anything
        # else (*args, **kwargs, keyword-only, positional-only) goes through inspect.
        self._simple = all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        unknown = set(self.key_arguments) - set(self._names) if func is not None else set()
        if unknown:
            raise InvalidArgumentsError(
                f"task {task_id.key!r}: key_arguments {sorted(unknown)} are not parameters "
                f"of the function (it has {list(self._names)})"
            )

    @property
    def key(self) -> str:
        """The task key (``module.func_name``)."""
        return self.task_id.key

    @property
    def binds_by_name(self) -> bool:
        """Whether binding only maps names to parameters (no ``*args``/``**kwargs``,
        keyword-only or positional-only parameters), so bound keys are argument names."""
        return self.signature is not None and self._simple

    def invoke(self, arguments: Mapping[str, Any]) -> Any:
        """Call the function with loaded arguments (bound by name; extra names ignored).

        :raises TypeError: as the function would, for missing arguments.
        """
        func = self.func
        assert func is not None
        assert self.signature is not None
        if self._simple and arguments.keys() == self._name_set:
            return func(**arguments)  # the usual case: every parameter, by name
        bound = inspect.BoundArguments(self.signature, dict(arguments))
        return func(*bound.args, **bound.kwargs)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Bind call arguments to the signature, defaults applied (pynenc's rule).

        :raises InvalidArgumentsError: as Python would raise TypeError, naming the task.
        """
        if self.signature is None:
            if args:
                raise InvalidArgumentsError(
                    f"task {self.key!r} is known only by id: pass arguments by keyword"
                )
            return dict(kwargs)
        if not self._simple:
            try:
                bound = self.signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise InvalidArgumentsError(f"task {self.key!r}: {exc}") from None
            bound.apply_defaults()
            return dict(bound.arguments)
        names = self._names
        if len(args) >= len(names):
            if len(args) == len(names) and not kwargs:
                # zip without strict=: a keyword argument makes the call 40% slower here.
                return dict(zip(names, args))  # noqa: B905 - equal lengths, checked above
            if len(args) > len(names):
                raise InvalidArgumentsError(
                    f"task {self.key!r}: takes {len(names)} positional arguments but "
                    f"{len(args)} were given"
                )
        out = dict(zip(names, args))  # noqa: B905 - fewer args than names, by design
        for name, value in kwargs.items():
            if name in out:
                raise InvalidArgumentsError(
                    f"task {self.key!r}: got multiple values for argument {name!r}"
                )
            out[name] = value
        if len(out) == len(names) and not kwargs:
            return out
        extra = out.keys() - set(names)
        if extra:
            raise InvalidArgumentsError(
                f"task {self.key!r}: got unexpected keyword arguments {sorted(extra)}"
            )
        result = {}
        for name in names:
            if name in out:
                result[name] = out[name]
            elif name in self._defaults:
                result[name] = self._defaults[name]
            else:
                missing = [n for n in names if n not in out and n not in self._defaults]
                raise InvalidArgumentsError(
                    f"task {self.key!r}: missing required arguments {missing}"
                )
        return result

    def offload_allowed(self, codec: OffloadCodec, name: str) -> bool:
        """Whether argument *name* may be offloaded (task and codec settings combined)."""
        if "*" in self.disable_offload or name in self.disable_offload:
            return False
        return codec.settings.offload_allowed(name)


def _with_call_context(exc: Exception, name: str, call_key: str) -> Exception:
    """The same error type, its message prefixed with the argument and the call."""
    prefix = f"argument {name!r} of call {call_key}: "
    if isinstance(exc, (BlobNotFoundError, BlobCorruptedError)):
        return type(exc)(prefix + str(exc), reference=exc.reference)
    if isinstance(exc, DeserializationError):
        return type(exc)(prefix + str(exc))
    return exc


class _CallBase(Generic[R]):
    """Identity shared by every call flavour: equality and hash by call id."""

    __slots__ = ("codec", "spec")

    spec: TaskSpec
    codec: OffloadCodec

    @property
    def task_id(self) -> TaskId:
        """The task this call runs."""
        return self.spec.task_id

    @property
    def serialized_arguments(self) -> Mapping[str, str]:
        """Argument name -> inline text or reference."""
        raise NotImplementedError

    @property
    def args_id(self) -> str:
        """The canonical args_id of the serialized arguments."""
        raise NotImplementedError

    @property
    def call_id(self) -> CallId:
        """Task and args_id together."""
        return make_call_id(self.spec.task_id, self.args_id)

    def to_dto(self) -> CallDTO:
        """The call as a :class:`~acall.dto.CallDTO`."""
        # make_call_dto copies the mapping itself (as CallDTO's converter): no copy here.
        return make_call_dto(self.call_id, self.serialized_arguments)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _CallBase):
            return NotImplemented
        return self.call_id == other.call_id

    def __hash__(self) -> int:
        return hash(self.call_id)


class _NeedsAsyncPath(Exception):
    """Internal: the synchronous fast path hit a failure; the full path reports it."""


class Call(_CallBase[R]):
    """A client-side call: a task and its (bound) Python arguments.

    Identity (``args_id``, ``call_id``, ``to_dto()``, equality, hashing) follows from the
    serialized arguments, so it is available after ``await call.serialize()``;
    asking before raises :class:`~acall.errors.NotSerializedError`.
    """

    __slots__ = (
        "_args_id",
        "_arguments",
        "_base",
        "_call_id",
        "_done",
        "_flight",
        "_serialized",
        "_staged",
    )

    def __init__(self, spec: TaskSpec, codec: OffloadCodec, arguments: Mapping[str, Any]) -> None:
        self.spec = spec
        self.codec = codec
        self._arguments = dict(arguments)
        self._done: dict[str, str] = {}
        # How many entries _done holds before anything of this call is encoded (a
        # batch's common arguments).
        self._base = 0
        self._staged: dict[str, Prepared] = {}
        self._serialized: dict[str, str] | None = None
        self._args_id: str | None = None
        self._call_id: CallId | None = None
        self._flight: SingleFlight[int, dict[str, str]] | None = None

    @classmethod
    def from_args(
        cls, spec: TaskSpec, codec: OffloadCodec, /, *args: Any, **kwargs: Any
    ) -> Call[R]:
        """Bind ``*args, **kwargs`` to the task's signature (defaults applied)."""
        return cls(spec, codec, spec.bind(args, kwargs))

    @property
    def arguments(self) -> Mapping[str, Any]:
        """The bound Python arguments."""
        return self._arguments

    @property
    def arg_keys(self) -> frozenset[str]:
        """Argument names."""
        return frozenset(self._arguments)

    @property
    def is_serialized(self) -> bool:
        """Whether :meth:`serialize` has completed."""
        return self._serialized is not None

    @property
    def serialized_arguments(self) -> Mapping[str, str]:
        """The serialized arguments (after :meth:`serialize`)."""
        if self._serialized is None:
            raise NotSerializedError(
                f"call of task {self.spec.key!r} is not serialized yet: await call.serialize() "
                "before asking for its identity"
            )
        return self._serialized

    @property
    def args_id(self) -> str:
        """The canonical args_id (after :meth:`serialize`)."""
        if self._args_id is None:
            self._args_id = compute_args_id(self.serialized_arguments)
        return self._args_id

    @property
    def call_id(self) -> CallId:
        """Task and args_id together (after :meth:`serialize`)."""
        if self._call_id is None:
            self._call_id = make_call_id(self.spec.task_id, self.args_id)
        return self._call_id

    def to_dto(self) -> CallDTO:
        """The call as a :class:`~acall.dto.CallDTO` (after :meth:`serialize`)."""
        # What the properties do, without their calls: every submission comes here.
        serialized = self._serialized
        if serialized is None:
            return make_call_dto(self.call_id, self.serialized_arguments)  # raises
        call_id = self._call_id
        if call_id is None:
            args_id = self._args_id
            if args_id is None:
                args_id = self._args_id = compute_args_id(serialized)
            call_id = self._call_id = make_call_id(self.spec.task_id, args_id)
        return make_call_dto(call_id, serialized)

    async def serialize(self) -> Mapping[str, str]:
        """Serialize (and offload) every argument once; concurrent awaits share the work.

        :raises CallSerializationError: listing *every* argument that failed, with the
            task, the argument, the type and a truncated repr.
        :raises StoreError: when writing an offloaded value fails.
        """
        if self._serialized is not None:
            return self._serialized
        if self._flight is None:
            # Most calls have only small inline arguments: encode them right here, with
            # no await in between (so no other task can interleave) and no flight.
            before = len(self._done)
            try:
                large = self._encode_now(self._pending_names(), None)
            except _NeedsAsyncPath:
                large = None
            if large == [] and not self._staged:
                # The pending names were added to _done in argument order; when nothing
                # but a batch's common arguments (which come first) was there before,
                # that is the wire order already and _done is the result as it is.
                if before == self._base:
                    self._serialized = self._done
                else:
                    self._serialized = {name: self._done[name] for name in self._names_in_order()}
                return self._serialized
            self._flight = SingleFlight()
        return await self._flight.run(0, self._serialize_all)

    def _encode_now(
        self, names: list[str], failures: list[tuple[str, Exception]] | None
    ) -> list[str]:
        """Encode the small ones of *names* on the spot; return the large ones' names.

        Inline text lands in ``_done``, values to offload in ``_staged`` (committed by
        :meth:`_encode`). A failing argument is added to *failures*, or, when that is
        ``None`` (the fast path), aborts with :class:`_NeedsAsyncPath`.
        """
        spec, codec = self.spec, self.codec
        types = spec.typed
        typed = types.annotations if types is not None else _NO_TYPES
        min_offload = codec.settings.min_size_to_offload
        serializer = codec.serializer
        dumps = serializer.dumps
        arguments, done = self._arguments, self._done
        inline_chars = 0
        large: list[str] = []
        for name in names:
            value = arguments[name]
            kind = type(value)
            try:
                if name in typed:
                    text = None
                elif kind in _SCALAR_KINDS or (kind is str and len(value) * 6 < min_offload):
                    # Scalars and short strings: their text is short for sure (escaping at
                    # most sextuples a character), so no size estimate is needed.
                    text = dumps(value)
                elif (
                    (kind is list or kind is tuple)
                    and len(value) <= _FEW_ITEMS
                    and set(map(type, value)) <= _SCALAR_KINDS
                ):
                    # Short lists of exact scalars: short too, and no enum member can
                    # hide in them, which the serializer may use to skip its checks.
                    text = getattr(serializer, "dumps_scalars", dumps)(value)
                else:
                    text = None
                if text is None:
                    if estimate_chars(value, THREAD_MIN_CHARS) >= THREAD_MIN_CHARS:
                        large.append(name)
                        continue
                    if types is not None:
                        value = types.unstructure(name, value)
                    text = dumps(value)
                size = len(text)
                if size >= min_offload:
                    prep = codec.route_text(text, offload=spec.offload_allowed(codec, name))
                    if prep.inline is None:
                        self._staged[name] = prep
                        continue
            except Exception as exc:
                if failures is None:
                    raise _NeedsAsyncPath from exc
                failures.append((name, exc))
                continue
            inline_chars += size
            done[name] = text
        codec.stats["inline_chars"] += inline_chars
        return large

    async def _serialize_all(self) -> dict[str, str]:
        if self._serialized is None:
            await self._encode(self._pending_names())
            self._serialized = {name: self._done[name] for name in self._names_in_order()}
        return self._serialized

    def _pending_names(self) -> list[str]:
        if len(self._done) == self._base:
            return list(self._arguments)
        return [n for n in self._arguments if n not in self._done]

    def _names_in_order(self) -> list[str]:
        return list(self._arguments)

    async def serialized_args_for_concurrency_control(
        self, mode: ConcurrencyMode
    ) -> dict[str, str] | None:
        """The serialized arguments that identify this call under *mode*.

        ``DISABLED``/``TASK`` need none (``None``); ``ARGUMENTS`` needs all of them;
        ``KEYS`` encodes *only* the task's key arguments (results are kept, so a later
        full serialization does not encode them again).
        """
        if mode in (ConcurrencyMode.DISABLED, ConcurrencyMode.TASK):
            return None
        if mode is ConcurrencyMode.ARGUMENTS:
            return dict(await self.serialize())
        keys = self.spec.key_arguments
        missing = [k for k in keys if k not in self._done]
        if missing:
            await self._encode([k for k in missing if k in self._arguments])
        return {k: self._done[k] for k in keys if k in self._done}

    async def _encode(self, names: list[str]) -> None:
        """Encode *names* into ``self._done``: small on the loop, large in threads."""
        failures: list[tuple[str, Exception]] = []
        large = self._encode_now(
            [n for n in names if n not in self._done and n not in self._staged], failures
        )
        to_commit = [(n, self._staged.pop(n)) for n in names if n in self._staged]
        if to_commit or large:
            async with anyio.create_task_group() as tg:
                for name, prep in to_commit:
                    tg.start_soon(self._commit, name, prep, failures)
                for name in large:
                    tg.start_soon(self._encode_large, name, failures)
        if failures:
            self._raise(failures)

    async def _commit(
        self, name: str, prep: Prepared, failures: list[tuple[str, Exception]]
    ) -> None:
        try:
            self._done[name] = await self.codec.commit(prep)
        except Exception as exc:
            failures.append((name, exc))

    async def _encode_large(self, name: str, failures: list[tuple[str, Exception]]) -> None:
        spec, codec = self.spec, self.codec
        types = spec.param_types
        transform = (lambda v: types.unstructure(name, v)) if types else None
        offload = spec.offload_allowed(codec, name)
        try:
            prep = await codec.prepare_large(
                self._arguments[name], offload=offload, transform=transform
            )
            self._done[name] = await self.codec.commit(prep)
        except Exception as exc:
            failures.append((name, exc))

    def _raise(self, failures: list[tuple[str, Exception]]) -> None:
        # Store and other infrastructure errors are not the arguments' fault: raise the
        # first of them as it is. Otherwise report every failing argument at once.
        for _, exc in failures:
            if not isinstance(exc, SerializationError | ArgumentTypeError):
                raise exc
        raise CallSerializationError(self.spec.key, failures) from failures[0][1]

    def __repr__(self) -> str:
        return f"Call({self.spec.key}, arguments={sorted(self._arguments)})"


def _refuse_clash(spec: TaskSpec, common: Mapping[str, Any], own: Mapping[str, Any]) -> None:
    """Raise if an argument is given both as a common and as a per-call argument."""
    if not common.keys().isdisjoint(own):
        raise InvalidArgumentsError(
            f"task {spec.key!r}: arguments {sorted(common.keys() & own.keys())} are given "
            "both as common and per-call arguments"
        )


def _bind_batch(
    spec: TaskSpec,
    common_args: Mapping[str, Any],
    common_serialized: Mapping[str, str],
    per_call: Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The own arguments of each call of a batch, bound and checked."""
    owns = []
    # Calls of a batch mostly pass the same names: the checks and the binding are
    # done once per set of names, giving a template (signature order, defaults
    # filled) that each call copies and fills with its own values.
    templates: dict[tuple[str, ...], dict[str, Any]] = {}
    for own in per_call:
        names = tuple(own)
        template = templates.get(names)
        if template is None:
            # Before binding: merged into one mapping, a clash would go unnoticed.
            _refuse_clash(spec, common_args, own)
            bound = spec.bind((), {**common_args, **own})
            others = {k: v for k, v in bound.items() if k not in common_serialized}
            if spec.binds_by_name:
                templates[names] = others.copy()  # the call owns others
        else:
            others = template.copy()
            others.update(own)
        owns.append(others)
    return owns


class PreSerializedCall(Call[R]):
    """A call of a batch whose common arguments were serialized once.

    Build batches with :meth:`batch`; only each call's own arguments are encoded per
    call, the shared ones (and their offloaded blobs) are reused as they are.
    """

    __slots__ = ("_common",)

    def __init__(
        self,
        spec: TaskSpec,
        codec: OffloadCodec,
        common_serialized: Mapping[str, str],
        other_args: Mapping[str, Any],
    ) -> None:
        super().__init__(spec, codec, other_args)
        _refuse_clash(spec, common_serialized, self._arguments)
        self._common = common_serialized
        self._done.update(common_serialized)
        self._base = len(common_serialized)

    @classmethod
    def _of_batch(
        cls, spec: TaskSpec, codec: OffloadCodec, common: Mapping[str, str], own: dict[str, Any]
    ) -> PreSerializedCall[R]:
        """A call of :meth:`batch`, which checked its names already (once per set of
        names) and made *own* for it alone: the constructor's copy and check skipped."""
        call = cls.__new__(cls)
        call.spec = spec
        call.codec = codec
        call._arguments = own
        call._done = dict(common)
        call._base = len(common)
        call._staged = {}
        call._serialized = None
        call._args_id = None
        call._call_id = None
        call._flight = None
        call._common = common
        return call

    @classmethod
    async def serialize_common(
        cls, spec: TaskSpec, codec: OffloadCodec, common_args: Mapping[str, Any]
    ) -> dict[str, str]:
        """Serialize (and offload) the shared arguments of a batch, once."""
        shared: Call[Any] = Call(spec, codec, common_args)
        return dict(await shared.serialize())

    @classmethod
    async def batch(
        cls,
        spec: TaskSpec,
        codec: OffloadCodec,
        common_args: Mapping[str, Any],
        per_call: Iterable[Mapping[str, Any]],
    ) -> list[PreSerializedCall[R]]:
        """Build one call per mapping in *per_call*, sharing *common_args*.

        Each call's arguments are the common ones updated with its own, bound to the
        signature with defaults applied. Nothing per call is serialized yet.
        """
        chunks = await cls.batch_chunks(spec, codec, common_args, per_call, size=sys.maxsize)
        return next(chunks, [])

    @classmethod
    async def batch_chunks(
        cls,
        spec: TaskSpec,
        codec: OffloadCodec,
        common_args: Mapping[str, Any],
        per_call: Iterable[Mapping[str, Any]],
        *,
        size: int,
    ) -> Iterator[list[PreSerializedCall[R]]]:
        """:meth:`batch` in lists of at most *size* calls, each list made when it is
        taken: a batch of 100,000 does not hold 100,000 call objects at once.

        Every mapping is bound and checked before this returns, so a bad one raises
        before any call is made.
        """
        common_serialized = await cls.serialize_common(spec, codec, common_args)
        owns = _bind_batch(spec, common_args, common_serialized, per_call)
        return (
            [cls._of_batch(spec, codec, common_serialized, own) for own in owns[i : i + size]]
            for i in range(0, len(owns), size)
        )

    def _names_in_order(self) -> list[str]:
        names = list(self._common)
        names.extend(n for n in self._arguments if n not in self._common)
        return names

    @property
    def arg_keys(self) -> frozenset[str]:
        """Argument names, common and own."""
        return frozenset(self._common) | frozenset(self._arguments)

    def __repr__(self) -> str:
        return (
            f"PreSerializedCall({self.spec.key}, common={sorted(self._common)}, "
            f"own={sorted(self._arguments)})"
        )


class LazyCall(_CallBase[R]):
    """A worker-side call rebuilt from a DTO; nothing is decoded until asked for.

    Identity (``call_id``, ``args_id``, ``arg_keys``, equality) is plain attribute
    access. ``await arguments()`` loads everything with one batched fetch;
    ``await argument(name)`` loads one argument alone. Loaded values are cached on this
    object only (another invocation of the same call decodes its own copies).
    """

    __slots__ = ("_call_id", "_loaded", "_serialized")

    def __init__(self, spec: TaskSpec, codec: OffloadCodec, dto: CallDTO) -> None:
        self.spec = spec
        self.codec = codec
        self._call_id = dto.call_id
        self._serialized = dto.serialized_arguments
        self._loaded: dict[str, Any] = {}

    @classmethod
    def from_dto(cls, spec: TaskSpec, codec: OffloadCodec, dto: CallDTO) -> LazyCall[R]:
        """Wrap *dto*: no decoding, no I/O."""
        return cls(spec, codec, dto)

    @property
    def call_id(self) -> CallId:
        """The call id carried by the DTO."""
        return self._call_id

    @property
    def args_id(self) -> str:
        """The args_id carried by the DTO."""
        return self._call_id.args_id

    @property
    def serialized_arguments(self) -> Mapping[str, str]:
        """Argument name -> inline text or reference, as received."""
        return self._serialized

    @property
    def arg_keys(self) -> frozenset[str]:
        """Argument names."""
        return frozenset(self._serialized)

    def to_dto(self) -> CallDTO:
        """The DTO this call was built from."""
        return make_call_dto(self._call_id, self._serialized)

    async def argument(self, name: str) -> Any:
        """Load one argument (fetching only its own blob, if any)."""
        if name not in self._serialized:
            raise KeyError(f"call {self._call_id.key} has no argument {name!r}")
        if name not in self._loaded:
            await self._load([name])
        return self._loaded[name]

    def arguments_now(self) -> dict[str, Any] | None:
        """Every argument, loaded here and now when that needs no I/O and no thread
        (all inline and small, none typed: the usual call); else ``None``, and
        :meth:`arguments` loads them. Cached like :meth:`arguments`."""
        if self._loaded or self.spec.typed is not None:
            return None
        serialized = self._serialized
        # (A plain loop, not all() over a generator: this runs for every call.)
        for t in serialized.values():
            if len(t) >= _INLINE_FAST or t.startswith(REFERENCE_PREFIX):
                return None
        loads = self.codec.serializer.loads
        try:
            self._loaded = {n: loads(t) for n, t in serialized.items()}
        except DeserializationError:
            self._loaded = {}  # the slow path names the argument that failed
            return None
        return dict(self._loaded)

    async def arguments(self) -> dict[str, Any]:
        """Load every argument: one batched fetch for all references, cached."""
        loaded = self.arguments_now()
        if loaded is not None:
            return loaded
        missing = [n for n in self._serialized if n not in self._loaded]
        if missing:
            await self._load(missing)
        return {n: self._loaded[n] for n in self._serialized}

    async def _load(self, names: list[str]) -> None:
        key = self._call_id.key
        texts = {n: self._serialized[n] for n in names}
        refs = {n: t for n, t in texts.items() if t.startswith(REFERENCE_PREFIX)}
        loaded: dict[str, Any] = {}
        if refs:
            try:
                # Large blobs come back deserialized too (checked and parsed by one
                # thread each, so parsing one overlaps hashing the others).
                fetched, values = await self.codec.fetch_loaded(refs.values())
            except (BlobNotFoundError, BlobCorruptedError) as exc:
                name = next((n for n, r in refs.items() if r == exc.reference), "?")
                raise _with_call_context(exc, name, key) from None
            for n, ref in refs.items():
                texts[n] = fetched[ref]
                # A value object goes to one argument only (two arguments may share a
                # blob; each must get its own object).
                value = values.pop(ref, _MISSING)
                if isinstance(value, LoadFailure):
                    raise _with_call_context(value.error, n, key) from None
                if value is not _MISSING:
                    loaded[n] = value
        large: list[str] = []
        for n, t in texts.items():
            if n in loaded:  # deserialized with its blob
                continue
            if len(t) >= THREAD_MIN_CHARS:
                large.append(n)
            else:
                loaded[n] = self._decode_small(n, t, key)
        if large:
            errors: list[Exception] = []
            async with anyio.create_task_group() as tg:
                for n in large:
                    tg.start_soon(self._decode_large, n, texts[n], key, loaded, errors)
            if errors:
                raise errors[0]
        types = self.spec.param_types
        for n in names:
            value = loaded[n]
            self._loaded[n] = types.structure(n, value) if types else value

    def _decode_small(self, name: str, text: str, key: str) -> Any:
        try:
            return self.codec.serializer.loads(text)
        except DeserializationError as exc:
            raise _with_call_context(exc, name, key) from None

    async def _decode_large(
        self, name: str, text: str, key: str, out: dict[str, Any], errors: list[Exception]
    ) -> None:
        try:
            out[name] = await self.codec.loads(text)
        except Exception as exc:
            errors.append(_with_call_context(exc, name, key))

    def __repr__(self) -> str:
        return f"LazyCall({self._call_id.key})"
