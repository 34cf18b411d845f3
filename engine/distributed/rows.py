"""Rows as Ray Data hands them to a batch function, as plain JSON-like dicts, and back.

A batch comes as a dict of numpy columns ("numpy" format, the default), a pandas DataFrame or
an Arrow table. A field a row lacks reads as None, or NaN in a float column; nested values
(the messages of a chat line) come as numpy arrays of dicts. Requests want plain Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def batch_rows(batch: Any) -> list[dict[str, Any]]:
    """The rows of a batch, each without the fields it lacks."""
    if hasattr(batch, "to_pylist"):  # an Arrow table
        rows = batch.to_pylist()
    elif hasattr(batch, "to_dict") and not isinstance(batch, Mapping):  # a pandas DataFrame
        rows = batch.to_dict("records")
    else:
        columns = {name: list(values) for name, values in batch.items()}
        count = len(next(iter(columns.values()), []))
        rows = [{name: values[i] for name, values in columns.items()} for i in range(count)]
    return [
        {name: plain(value) for name, value in row.items() if not _missing(value)} for row in rows
    ]


def plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values and lists, recursively."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items() if not _missing(v)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def columns(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list[Any]]:
    """Rows as a dict of columns, every row having every name (None where it has none)."""
    return {name: [row.get(name) for row in rows] for name in names}
