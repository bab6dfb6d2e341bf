"""One bounded walk over nested containers read from user files (checkpoints, JSON).

Every place that looks inside a loaded object goes through :func:`walk`, which never recurses
(an explicit stack: no ``RecursionError``), visits each container once (by ``id``, so a small
file whose sub-dicts are shared many times over cannot expand exponentially), and keeps to a
depth and a node budget:

- :data:`MAX_DEPTH` levels of nesting at most;
- :data:`MAX_NODES` visited nodes at most (dict entries and nested containers; scalars
  inside lists and tuples are looked at but not counted).

:func:`check_nesting` is the strict form: a container that contains itself or nesting deeper
than :data:`MAX_DEPTH` is an error. :func:`loads_json` parses user JSON with the same depth
bound. The errors name no file: callers add it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cka_geo.errors import CkaGeoError, DataError

MAX_DEPTH = 100
"""Deepest nesting of containers accepted in a file (a real checkpoint needs about 30)."""
MAX_NODES = 300_000
"""Most dict entries plus nested containers visited in one walk (a ViT-L Lightning file with
its optimizer state has a few thousand)."""
MAX_JSON_CHARS = 64 * 2**20
"""Longest JSON text parsed from a file (64 MiB)."""

Key = Any
Children = Callable[[Any], Iterable[tuple[Key, Any]] | None]
_SEQUENCES = (list, tuple, set, frozenset)


def container_items(node: Any) -> Iterable[tuple[Key, Any]] | None:
    """The entries of a dict, list, tuple or set; None for anything else (a leaf)."""
    if isinstance(node, dict):
        return node.items()
    if isinstance(node, _SEQUENCES):
        return enumerate(node)
    return None


def key_name(key: Key) -> Key:
    """A key as a path element: str and int kept, other types named by their type only.

    Turning an arbitrary key into text could recurse (a deeply nested tuple as a dict key)
    or be huge, so only plain keys are kept as they are.
    """
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    if key is None or isinstance(key, (bool, float)):
        return str(key)
    return f"<{type(key).__name__}>"


def describe_path(path: tuple[Key, ...], root: str = "ckpt", limit: int = 4) -> str:
    """``ckpt['a'][0]['b']``, shortened to the first ``limit`` keys (then ``…``)."""
    shown = "".join(f"[{key!r}]" for key in path[:limit])
    text = root + shown + ("…" if len(path) > limit else "")
    return text if len(text) <= 200 else text[:199] + "…"


def walk(
    root: Any,
    children: Children = container_items,
    *,
    stop_at: int | None = None,
    strict: bool = False,
    max_depth: int | None = None,
    max_nodes: int | None = None,
    error: type[CkaGeoError] = DataError,
    root_name: str = "ckpt",
) -> Iterator[tuple[tuple[Key, ...], Any]]:
    """Yield ``(path, value)`` for every entry below ``root``, depth first, in order.

    Args:
        root: The object (not yielded itself).
        children: ``node -> iterable of (key, child)``, or None when ``node`` is a leaf.
        stop_at: Do not look inside nodes at this depth or deeper (the root is depth 0);
            they are still yielded.
        strict: Raise on a container that contains itself and on nesting deeper than
            ``max_depth``; otherwise a container already on the path is simply not entered
            again and nesting beyond ``max_depth`` is not entered.
        max_depth: Deepest container entered (default :data:`MAX_DEPTH`).
        max_nodes: Node budget (default :data:`MAX_NODES`); exceeding it always raises.
        error: The :class:`~cka_geo.errors.CkaGeoError` subclass raised.
        root_name: What to call the root in messages.

    Yields:
        The path (keys from the root; see :func:`key_name`) and the value. A container
        reached a second time (shared) is yielded again but not entered again.

    Raises:
        CkaGeoError: ``error``, one line, when a bound is exceeded (see ``strict``).
    """
    depth_limit = MAX_DEPTH if max_depth is None else max_depth
    node_limit = MAX_NODES if max_nodes is None else max_nodes
    first = children(root)
    if first is None:
        return
    seen = {id(root)}
    on_path = [id(root)]
    stack: list[tuple[tuple[Key, ...], Iterator[tuple[Key, Any]], bool]] = [
        ((), iter(first), isinstance(root, _SEQUENCES))
    ]
    nodes = 0
    while stack:
        path, entries, in_sequence = stack[-1]
        try:
            key, value = next(entries)
        except StopIteration:
            stack.pop()
            on_path.pop()
            continue
        sub = children(value)
        if sub is not None or not in_sequence:  # leaves in lists and tuples are not counted
            nodes += 1
            if nodes > node_limit:
                raise error(
                    f"holds more than {node_limit} nested entries (near "
                    f"{describe_path((*path, key_name(key)), root_name)}): refused"
                )
        here = (*path, key_name(key))
        yield here, value
        if sub is None or (stop_at is not None and len(here) >= stop_at):
            continue
        ident = id(value)
        if ident in seen:
            if strict and ident in on_path:
                raise error(f"refers to itself: {describe_path(here, root_name)} contains itself")
            continue
        if len(here) >= depth_limit:  # the root is level 1
            if strict:
                raise error(
                    f"nested deeper than {depth_limit} levels (at "
                    f"{describe_path(here, root_name)}): refused"
                )
            continue
        seen.add(ident)
        on_path.append(ident)
        stack.append((here, iter(sub), isinstance(value, _SEQUENCES)))


def check_nesting(
    obj: Any, *, error: type[CkaGeoError] = DataError, root_name: str = "ckpt"
) -> None:
    """Refuse ``obj`` if a container in it contains itself, nests deeper than
    :data:`MAX_DEPTH` or holds more than :data:`MAX_NODES` entries in all.

    Args:
        obj: A loaded object (dicts, lists, tuples, sets and leaves).
        error: The error class raised.
        root_name: What to call ``obj`` in the message.

    Raises:
        CkaGeoError: ``error``, one line naming where the bound was exceeded.
    """
    for _ in walk(obj, strict=True, error=error, root_name=root_name):
        pass


def loads_json(
    text: str | bytes, *, error: type[CkaGeoError] = DataError, root_name: str = "json"
) -> Any:
    """``json.loads`` with the bounds of :func:`check_nesting` and :data:`MAX_JSON_CHARS`.

    Args:
        text: The JSON text.
        error: The error class raised for the bounds (JSON syntax errors are re-raised as
            :class:`json.JSONDecodeError` so that callers can say where).
        root_name: What to call the document in messages.

    Returns:
        The parsed value.

    Raises:
        json.JSONDecodeError: Invalid JSON.
        CkaGeoError: ``error``: too long, nested too deep, or a number too long to convert.

    >>> loads_json('{"a": [1, 2]}')
    {'a': [1, 2]}
    >>> loads_json("[" * 5000 + "]" * 5000)
    Traceback (most recent call last):
    ...
    cka_geo.errors.DataError: nested deeper than 100 levels: refused
    """
    if len(text) > MAX_JSON_CHARS:
        raise error(f"JSON text of {len(text)} characters, more than {MAX_JSON_CHARS}: refused")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise error(f"nested deeper than {MAX_DEPTH} levels: refused") from None
    except ValueError:  # an integer with more digits than int() converts
        raise error("unreadable JSON (a number with too many digits)") from None
    check_nesting(value, error=error, root_name=root_name)
    return value
