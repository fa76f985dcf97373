"""Transactional enqueue: the task exists only if the caller's transaction commits.

An order row and the task that emails its receipt are written in one SQLAlchemy transaction; a
rollback leaves neither, so a worker can never email a receipt for an order that does not exist.

Run: python examples/transactional_enqueue.py
"""

from __future__ import annotations

from sqlalchemy import create_engine, text

from jobqueue import Client, Context, task
from jobqueue.db.connect import resolve_url, sqlalchemy_url


@task("send_receipt")
async def send_receipt(ctx: Context, payload: dict[str, int]) -> None:
    ctx.log.info("emailing receipt for order %s", payload["order_id"])


def main() -> tuple[int, int]:
    url = resolve_url()
    engine = create_engine(sqlalchemy_url(url))
    client = Client(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS public.example_orders (id serial PRIMARY KEY, total int)"))
    # Committed: the order and its task both exist.
    with engine.begin() as conn:
        order_id = conn.execute(text("INSERT INTO public.example_orders (total) VALUES (42) RETURNING id")).scalar_one()
        client.enqueue("send_receipt", {"order_id": order_id}, connection=conn)
    # Rolled back: neither exists.
    with engine.connect() as conn:
        doomed = conn.execute(text("INSERT INTO public.example_orders (total) VALUES (7) RETURNING id")).scalar_one()
        client.enqueue("send_receipt", {"order_id": doomed}, connection=conn)
        conn.rollback()
    kept = len(client.list(type="send_receipt"))
    with engine.connect() as conn:
        orders = conn.execute(text("SELECT count(*) FROM public.example_orders")).scalar_one()
    client.close()
    engine.dispose()
    print(f"orders: {orders}, receipt tasks: {kept}")
    return orders, kept


if __name__ == "__main__":
    main()
