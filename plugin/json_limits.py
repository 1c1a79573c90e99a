"""Decode JSON that came from another process or device, with a limit on nesting.

`json.loads` raises `RecursionError`, not `json.JSONDecodeError`, on text
such as ``"[" * 100000``, which nests deeper than Python's recursion limit.
Text that stays just below that limit decodes, but then `repr`, `str`,
`json.dumps` and `dataclasses.asdict` of the value recurse once or twice per
level and can fail deeper in the call stack. `loads_limited` turns both cases
into a `ValueError`, like any other invalid JSON, so each caller can raise its
own error type with its own message.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "loads_limited"]

MAX_JSON_DEPTH = 64
"""Nesting levels that `loads_limited` accepts by default.

The plans, jobs, budgets and messages that homesplit writes nest at most four
levels, apart from keyword arguments that a user gives, such as a job's
``model_kwargs``. 64 levels keep recursive code on the value far below
Python's default recursion limit of 1000, even when the caller already runs
hundreds of frames deep.
"""


def loads_limited(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode JSON text and check that it nests at most `max_depth` levels.

    Parameters
    ----------
    text : str or bytes
        JSON text, as `json.loads` accepts it.
    max_depth : int, default MAX_JSON_DEPTH
        Levels of nested arrays and objects allowed: ``1`` is ``[1, 2]`` and
        ``2`` is ``[[1], {"a": 2}]``. A scalar nests 0 levels.

    Returns
    -------
    Any
        The decoded value.

    Raises
    ------
    ValueError
        If `text` is not valid JSON (then a `json.JSONDecodeError`), or if it
        nests deeper than `max_depth` levels. The message never contains
        `text` itself, so it stays short for huge input.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nests too deeply to decode within Python's recursion limit") from None
    _check_depth(value, max_depth)
    return value


def _check_depth(value: Any, max_depth: int) -> None:
    # Walk an explicit stack, because deep recursion is what this check guards against.
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        container, depth = stack.pop()
        if depth > max_depth:
            raise ValueError(f"JSON nests deeper than {max_depth} levels of arrays and objects")
        children = container.values() if isinstance(container, dict) else container
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
