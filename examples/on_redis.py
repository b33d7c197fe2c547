"""The same API on Redis: a worker in another process, clients anywhere.

Start a worker:   acall worker examples.on_redis:app --broker redis://127.0.0.1:6379/0
Then submit:      python examples/on_redis.py redis://127.0.0.1:6379/0
With no worker running, pass --with-worker to run one in this process.
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
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    anyio.run(main, args[0] if args else "redis://127.0.0.1:6379/0", "--with-worker" in sys.argv)
