"""Data processing with typed arguments: dataclasses, datetimes, Decimals travel as
plain JSON and come back as the annotated types.

Run: python examples/typed_pipeline.py
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal

import anyio

from acall import App, Worker

app = App("memory://typed")


@dataclasses.dataclass(frozen=True)
class Order:
    id: int
    placed: dt.datetime
    amount: Decimal
    tags: frozenset[str]


@dataclasses.dataclass
class Report:
    day: dt.date
    orders: int
    revenue: Decimal


@app.task
async def daily_report(day: dt.date, orders: list[Order]) -> Report:
    same_day = [o for o in orders if o.placed.date() == day]
    return Report(day, len(same_day), sum((o.amount for o in same_day), Decimal(0)))


async def main() -> None:
    day = dt.date(2026, 11, 28)
    orders = [
        Order(
            i,
            dt.datetime(2026, 11, 27 + i % 2, 9, tzinfo=dt.UTC),
            Decimal("9.99") * i,
            frozenset({"web"}),
        )
        for i in range(1, 7)
    ]
    async with app:
        worker = Worker(app, handle_signals=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            report = await (await daily_report.submit(day, orders)).result(timeout=10)
            worker.stop()
    assert isinstance(report, Report)
    assert isinstance(report.revenue, Decimal)
    print(report)


if __name__ == "__main__":
    anyio.run(main)
