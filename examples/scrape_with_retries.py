"""An async scrape-style task with retries, backoff and a timeout.

A fake "site" fails the first attempts of each page; acall retries them with jittered
exponential backoff until they succeed. Run: python examples/scrape_with_retries.py
"""

from __future__ import annotations

import anyio

from acall import App, Worker, current_invocation

app = App("memory://scrape")


class TemporaryHTTPError(Exception):
    """What a real client would raise for a 503."""


@app.task(retries=4, backoff=0.05, retry_on=(TemporaryHTTPError,), timeout=5)
async def fetch(url: str) -> dict[str, object]:
    ctx = current_invocation()
    attempt = ctx.attempt if ctx else 1
    await anyio.sleep(0.01)  # the network
    if attempt < 1 + len(url) % 3:  # some pages fail once or twice
        raise TemporaryHTTPError(f"503 for {url} (attempt {attempt})")
    return {"url": url, "length": len(url) * 100, "attempts": attempt}


async def main() -> None:
    urls = [f"https://example.test/page/{i}" for i in range(12)]
    async with app:
        worker = Worker(app, concurrency=8, handle_signals=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            handles = [await fetch.submit(u) for u in urls]
            pages = [await h.result(timeout=30) for h in handles]
            worker.stop()
    retried = sum(1 for p in pages if p["attempts"] != 1)
    print(f"fetched {len(pages)} pages; {retried} needed retries; worker stats {worker.stats}")


if __name__ == "__main__":
    anyio.run(main)
