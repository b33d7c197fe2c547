"""Fan-out: many calls sharing one large argument, serialized and stored once.

Run: python examples/fan_out.py
"""

from __future__ import annotations

import anyio

from acall import App, Worker

app = App("memory://fan-out")


@app.task
async def lookup(table: dict[str, float], key: str) -> float:
    """One of many calls that all read the same large table."""
    return table[key] * 2


async def main() -> None:
    table = {f"sku-{i}": i * 0.5 for i in range(200_000)}  # ~5 MB of JSON
    async with app:
        worker = Worker(app, concurrency=32, handle_signals=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            handles = await lookup.submit_many(
                [{"key": f"sku-{i}"} for i in range(0, 200_000, 1000)],
                common_args={"table": table},
            )
            results = [await h.result(timeout=30) for h in handles]
            worker.stop()
    stats = app.codec.stats
    print(f"{len(results)} calls, first results {results[:3]}")
    uploads, size = stats["uploads"], stats["offloaded_bytes"]
    print(f"the table was offloaded once: {uploads} upload(s), {size:,} bytes")


if __name__ == "__main__":
    anyio.run(main)
