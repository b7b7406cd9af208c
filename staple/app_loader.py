"""Find the application ``staple serve --app MODULE:ATTR`` names, and tell which kind it is.

The rules, in order:

1. ``MODULE`` is imported with the current directory first on ``sys.path`` (as uvicorn and
   gunicorn do), then ``ATTR`` is looked up in it (dotted: ``web:factory.app``).
2. An ``aiohttp.web.Application`` is served as it is (:attr:`AppKind.AIOHTTP`).
3. An ASGI application is an async callable taking ``(scope, receive, send)``: a coroutine
   function, or an object whose ``__call__`` is one (Starlette, FastAPI, Django's
   ``ASGIHandler``...). It runs on uvicorn's protocols (:attr:`AppKind.ASGI`).
4. Any other callable that can be called with one argument (the argument list, as
   ``python -m aiohttp.web`` calls ``MODULE:FUNC``) or none is a factory. It is called in
   each serving process (each worker, as aiohttp's gunicorn worker does) by :func:`make_app`;
   what it returns, or what that returns when awaited, must be an Application (or an ASGI
   app, as uvicorn's ``--factory`` makes one).
5. Anything else is refused.

Every refusal is an :class:`AppError` whose message says what ``--app`` named and why it
cannot be served; its ``__cause__`` is the exception an import raised, if any.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["AppError", "AppKind", "FoundApp", "MadeApp", "find_app", "is_asgi", "make_app"]


class AppError(Exception):
    """``--app`` names nothing ``staple serve`` can serve; the message says why."""


class AppKind(enum.Enum):
    AIOHTTP = "aiohttp"
    ASGI = "ASGI"


@dataclass(frozen=True, slots=True)
class FoundApp:
    """What ``--app`` names: an app of a known kind, or a factory (``kind`` ``None``)."""

    spec: str
    target: Any
    kind: AppKind | None


@dataclass(frozen=True, slots=True)
class MadeApp:
    """An application ready to serve."""

    app: Any
    kind: AppKind


def find_app(spec: str, *, directory: str | None = None) -> FoundApp:
    """Import what ``spec`` (``MODULE:ATTR``) names, with ``directory`` (default: the current
    one) first on ``sys.path``, and classify it. Raises :class:`AppError`."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise AppError(f"--app {spec}: expected MODULE:ATTRIBUTE, e.g. myproject.web:app")
    _put_on_path(os.getcwd() if directory is None else directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and _is_same_or_parent(exc.name, module_name):
            raise AppError(
                f"--app {spec}: no module named {exc.name!r} (looked in the current "
                "directory and sys.path)"
            ) from None
        raise AppError(f"--app {spec}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise AppError(
            f"--app {spec}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            where = module_name if target is module else f"{module_name}:{attr}"
            raise AppError(f"--app {spec}: {where} has no attribute {part!r}") from None
    if isinstance(target, web.Application):
        return FoundApp(spec, target, AppKind.AIOHTTP)
    if is_asgi(target):
        return FoundApp(spec, target, AppKind.ASGI)
    if callable(target) and _factory_arguments(target) is not None:
        return FoundApp(spec, target, None)
    raise AppError(
        f"--app {spec}: {type(target).__name__} {target!r:.80} is neither an "
        "aiohttp.web.Application, an ASGI application (async, taking scope, receive, send), "
        "nor a factory of either (a callable taking an argument list, or nothing)"
    )


async def make_app(found: FoundApp, argv: Sequence[str] = ()) -> MadeApp:
    """The application to serve: ``found`` itself, or what its factory makes (called with
    ``argv`` as a list if it takes an argument, awaited if that gives an awaitable). Raises
    :class:`AppError` when the factory makes something else; what the factory raises
    propagates."""
    if found.kind is not None:
        return MadeApp(found.target, found.kind)
    arguments = _factory_arguments(found.target)
    made: Any = found.target(*([list(argv)] if arguments else []))
    if inspect.isawaitable(made):
        made = await made
    if isinstance(made, web.Application):
        return MadeApp(made, AppKind.AIOHTTP)
    if is_asgi(made):
        return MadeApp(made, AppKind.ASGI)
    raise AppError(
        f"--app {found.spec}: the factory returned {type(made).__name__} {made!r:.80}, "
        "not an aiohttp.web.Application or an ASGI application"
    )


def is_asgi(obj: object) -> bool:
    """Whether ``obj`` is an ASGI 3 application: async, callable as ``(scope, receive,
    send)``."""
    if not callable(obj):
        return False
    call = obj if inspect.isfunction(obj) or inspect.ismethod(obj) else type(obj).__call__
    if not (inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(call)):
        return False
    try:
        inspect.signature(obj).bind(None, None, None)
    except (TypeError, ValueError):
        return False
    return True


def _factory_arguments(target: Any) -> int | None:
    """How many arguments a factory takes (1: the argument list, 0: none), or ``None`` when
    it cannot be called either way."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: not ours to guess
        return None
    for count in (1, 0):
        try:
            signature.bind(*([None] * count))
        except TypeError:
            continue
        return count
    return None


def _is_same_or_parent(missing: str, module_name: str) -> bool:
    return module_name == missing or module_name.startswith(missing + ".")


def _put_on_path(directory: str) -> None:
    if directory not in sys.path and os.path.abspath(directory) not in map(_absolute, sys.path):
        sys.path.insert(0, directory)


def _absolute(entry: str) -> str:
    return os.path.abspath(entry or os.curdir)
