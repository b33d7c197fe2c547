"""The same API on Redis: a worker in another process, clients anywhere.

From the repository root, start a worker:
    acall worker examples.on_redis:app --broker redis://127.0.0.1:6379/0
then submit:
    python -m examples.on_redis redis://127.0.0.1:6379/0
With no worker running, add --with-worker to run one in this process.
"""

from __future__ import annotations

import sys

import anyio

from acall import App, Worker

app = App("redis://127.0.0.1:6379/0")


@app.task
async def word_count(text: str) -> int:
    return len(text.split())


async def main(url: str, with_worker: bool) -> None:
    app.configure(broker=url)
    async with app, anyio.create_task_group() as tg:
        worker = Worker(app, handle_signals=False)
        if with_worker:
            tg.start_soon(worker.run)
        book = "lorem ipsum dolor sit amet " * 50_000  # ~1.3 MB: offloaded to Redis
        handles = [await word_count.submit(book[: 1000 * (i + 1)]) for i in range(5)]
        handles.append(await word_count.submit(book))
        counts = [await h.result(timeout=60) for h in handles]
        worker.stop()
    print(f"word counts: {counts}")


if __name__ == "__main__":
    # Run the tasks under the module's importable name, examples.on_redis, not
    # __main__: a worker started with `acall worker examples.on_redis:app` knows them
    # by that key.
    from examples import on_redis

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    url = args[0] if args else "redis://127.0.0.1:6379/0"
    anyio.run(on_redis.main, url, "--with-worker" in sys.argv)
