"""The ``acall`` command line: ``worker``, ``demo`` and ``inspect``.

Errors a user can fix (an unknown module, a bad URL, an unreachable Redis) are printed
as one line, without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import anyio

from acall._sqlite import split_url
from acall.errors import AcallError, StoreUnavailableError
from acall.hashing import REFERENCE_PREFIX
from acall.stores.base import KEY_PATTERN

__all__ = ["load_app", "main"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` and return the :class:`~acall.tasks.App` it names."""
    from acall.tasks import App

    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise CliError(f"expected MODULE:APP (for example myproject.tasks:app), got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CliError(
            f"cannot import module {module_name!r}: {exc} (run from the project directory "
            "or set PYTHONPATH)"
        ) from None
    except Exception as exc:  # the module's own code failed (a SyntaxError included)
        raise CliError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc} "
            f"(python -c 'import {module_name}' shows the traceback)"
        ) from None
    app = getattr(module, attr, None)
    if not isinstance(app, App):
        found = "nothing" if app is None else type(app).__name__
        raise CliError(f"{spec!r} is not an acall App (found {found})")
    return app


def _configure(app: Any, broker: str | None, store: str | None) -> None:
    if broker is not None:
        app.configure(broker=broker, store=store)
    elif store is not None:
        # Keep the app's broker object itself: its URL is shown redacted, so reopening
        # it from app.broker.url would lose a password.
        app.configure(broker=app.broker, store=store)


def _app_of(args: argparse.Namespace) -> Any:
    """``--app MODULE:APP`` (with ``--broker`` / ``--store`` applied), or a plain app on
    ``--broker`` (default ``sqlite:///acall.db``) and ``--store``, for the commands that
    read what is there (a SQLite file that does not exist is an error, not created)."""
    from acall.tasks import App

    if not args.app:
        app = App(args.broker or "sqlite:///acall.db", args.store)
    else:
        app = load_app(args.app)
        _configure(app, args.broker, args.store)
    for backend in (app.broker, app.store):
        if backend.url.startswith("sqlite:"):
            path, _ = split_url(backend.url, "database")
            if not os.path.exists(path):
                raise CliError(
                    f"no database at {path} ({backend.url}): check the path, or --broker"
                )
    return app


async def _run_worker(args: argparse.Namespace) -> None:
    from acall.worker import Worker

    app = load_app(args.app)
    _configure(app, args.broker, args.store)
    queues = [q for q in args.queues.split(",") if q] if args.queues else None
    try:
        worker = Worker(
            app,
            concurrency=args.concurrency,
            prefetch=args.prefetch,
            queues=queues,
            visibility_timeout=args.visibility_timeout,
            grace_period=args.grace_period,
            collect_blobs=not args.no_collect,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    async with app:
        # A worker may start during a store outage: invocations that need the store
        # wait for it (the worker puts them back in their queue).
        await check_reachable(app, store_outage_ok=True)
        await worker.run()


async def check_reachable(app: Any, *, store_outage_ok: bool = False) -> None:
    """Fail fast, with the backend's one-line error, when the app's broker or store
    cannot be reached (rather than at the first invocation that needs it).

    :param store_outage_ok: only warn when the store does not answer. A misconfigured
        store (a bad path or option) fails all the same.
    """
    await app.broker.pending_count("default")
    try:
        await app.store.exists(_PROBE_KEY)
    except StoreUnavailableError as exc:
        if not store_outage_ok:
            raise
        logging.getLogger("acall.worker").warning(
            "%s; invocations with offloaded values will wait until it answers", exc
        )


#: A key no value has (the reference of no content): reading it checks the store answers.
_PROBE_KEY = REFERENCE_PREFIX + "0" * 64


async def _run_inspect(args: argparse.Namespace) -> None:
    from acall.dto import DTOCodec
    from acall.errors import InvalidKeyError
    from acall.ids import CallId
    from acall.results import rebuild_exception

    app = _app_of(args)
    async with app:
        target = args.key
        # Invocation ids may contain ':' like call keys do: try the id first.
        record = await app.broker.get(target) if KEY_PATTERN.fullmatch(target) else None
        if record is None:
            try:
                call_id = CallId.from_key(target)
            except InvalidKeyError:
                raise CliError(
                    f"no invocation with id {target!r:.120} in {app.broker.url}"
                ) from None
            matches = await app.broker.find_by_call(call_id.key)
            if not matches:
                raise CliError(f"no invocation of call {target!r:.120} in {app.broker.url}")
            record = matches[-1]
        doc = DTOCodec().to_dict(record)
        if args.resolve:
            doc["arguments"] = {
                name: await _resolve(app, value)
                for name, value in record.call.serialized_arguments.items()
            }
            if record.result is not None:
                doc["result_value"] = await _resolve(app, record.result)
        if record.error is not None:
            doc["error_rebuilt"] = repr(rebuild_exception(app.serializer, record))
        print(json.dumps(doc, indent=2, ensure_ascii=False, default=repr))


async def _resolve(app: Any, serialized: str) -> Any:
    from acall.errors import BlobNotFoundError

    try:
        return await app.codec.decode(serialized)
    except BlobNotFoundError:
        # The arguments of finished invocations are collected (acall.lifecycle).
        return f"<{serialized} is no longer stored: collected or expired>"


async def _run_collect(args: argparse.Namespace) -> None:
    from acall.lifecycle import BlobCollection, BlobCollector

    app = _app_of(args)
    settings = app.blob_collection or BlobCollection()
    if args.grace is not None:
        settings = BlobCollection(
            grace=args.grace, interval=settings.interval, batch_size=settings.batch_size
        )
    async with app:
        report = await BlobCollector(app.broker, app.store, settings).sweep(dry_run=args.dry_run)
    print(f"{'dry run: ' if args.dry_run else ''}{report}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acall", description="acall: asyncio-native calls, workers and brokers."
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="logging level (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run a worker for MODULE:APP")
    worker.add_argument("app", metavar="MODULE:APP", help="the App to serve, e.g. proj.tasks:app")
    worker.add_argument("--broker", help="broker URL (overrides the app's)")
    worker.add_argument("--store", help="data store URL (default: the broker's)")
    worker.add_argument("--concurrency", type=int, default=16, help="invocations at once")
    worker.add_argument(
        "--prefetch",
        type=int,
        help="entries held beyond the running ones (default: as many as --concurrency)",
    )
    worker.add_argument("--queues", help="comma-separated queues (default: all of the app's)")
    worker.add_argument("--visibility-timeout", type=float, default=30.0)
    worker.add_argument("--grace-period", type=float, default=30.0)
    worker.add_argument(
        "--no-collect", action="store_true", help="do not sweep unneeded blobs in this worker"
    )

    demo = sub.add_parser("demo", help="run the end-to-end demo (worker + submitted calls)")
    demo.add_argument("--broker", help="broker URL (default: a SQLite file in --workdir)")
    demo.add_argument("--store", help="data store URL (default: the broker's)")
    demo.add_argument("--workdir", help="directory for the SQLite file (default: a temp dir)")
    demo.add_argument("--small", type=int, default=500, help="number of small calls")
    demo.add_argument("--concurrency", type=int, default=16, help="worker concurrency")

    inspect = sub.add_parser("inspect", help="show an invocation by id or call key")
    inspect.add_argument("key", metavar="KEY_OR_ID", help="invocation id or call key")
    inspect.add_argument("--app", metavar="MODULE:APP", help="app to use (for its URLs/types)")
    inspect.add_argument("--broker", help="broker URL (default sqlite:///acall.db)")
    inspect.add_argument("--store", help="data store URL (default: the broker's)")
    inspect.add_argument(
        "--resolve", action="store_true", help="load the arguments and result values"
    )

    collect = sub.add_parser(
        "collect", help="delete offloaded values no invocation needs (one sweep)"
    )
    collect.add_argument("--app", metavar="MODULE:APP", help="app to use (for its settings)")
    collect.add_argument("--broker", help="broker URL (default sqlite:///acall.db)")
    collect.add_argument("--store", help="data store URL (default: the broker's)")
    collect.add_argument(
        "--grace",
        type=float,
        help="seconds an unneeded value must have been unused (default: the app's, 3600)",
    )
    collect.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``acall`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "worker":
            anyio.run(_run_worker, args)
            _exit_past_abandoned_threads()
        elif args.command == "demo":
            from acall.demo import run_demo

            anyio.run(run_demo, args)
        elif args.command == "collect":
            anyio.run(_run_collect, args)
        else:
            anyio.run(_run_inspect, args)
    except KeyboardInterrupt:
        return 130
    except (CliError, AcallError) as exc:
        print(f"acall: error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # The same errors raised inside a task group (the demo's submitters) come
        # wrapped. Only a group of nothing else is one line; anything else is a bug.
        known, rest = group.split((CliError, AcallError, KeyboardInterrupt))
        if known is None or rest is not None:
            raise
        first = _first_leaf(known)
        if isinstance(first, KeyboardInterrupt):
            return 130
        print(f"acall: error: {first}", file=sys.stderr)
        return 2
    return 0


def _exit_past_abandoned_threads() -> None:
    """End the process now if task threads are still running after the worker stopped.

    A plain task function cannot be interrupted: past the grace period its thread is
    abandoned and its invocation handed back for another worker. Waiting for such
    threads at exit would keep a stopped worker alive (and running that invocation
    twice at once) for as long as they take.
    """
    import threading

    main = threading.main_thread()
    waited_for = [t for t in threading.enumerate() if not t.daemon and t is not main]
    # Idle pool threads end on their own once the event loop has closed: a moment.
    deadline = time.monotonic() + 2.0
    for thread in waited_for:
        thread.join(max(0.0, deadline - time.monotonic()))
    waited_for = [t for t in waited_for if t.is_alive()]
    if waited_for:
        logging.getLogger("acall.worker").warning(
            "exiting with %d threads still running (task functions past the grace period: "
            "their invocations were handed back)",
            len(waited_for),
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
