"""References in the config: ``"pkg.module:function"`` resolved into callables, and storage
URLs (``s3://…``) shown without the credentials they may hold."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from steadytrain.config.errors import FactoryError


def resolve_callable(reference: str, *, field: str) -> Callable[..., Any]:
    """Import ``pkg.module:attr`` (dots after the colon walk attributes).

    Raises:
        FactoryError: naming ``field`` and what to fix when the reference cannot be used.
    """
    module_name, separator, attribute_path = reference.partition(":")
    if not separator or not module_name or not attribute_path:
        raise FactoryError(
            f"{field}: {reference!r} is not of the form 'pkg.module:function'; "
            "write the module path, a colon, then the callable's name"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise FactoryError(
            f"{field}: cannot import module {module_name!r} ({error}); install it or put its "
            "folder on PYTHONPATH"
        ) from None
    for part in attribute_path.split("."):
        if not hasattr(target, part):
            raise FactoryError(
                f"{field}: module {module_name!r} has no attribute {attribute_path!r}; "
                "check the name after the colon"
            )
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(f"{field}: {reference!r} is not callable; point it at a function")
    return target


def redact_url(url: str) -> str:
    """``url`` without any user:password part (for messages and records)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
