"""Choose a storage backend from a URI: a local path (or ``file://``) or any fsspec URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steadytrain.checkpoint.object_store import ObjectStorage
from steadytrain.checkpoint.storage import CheckpointStorage, LocalStorage
from steadytrain.config import Config, ConfigError, redact_url, usable_storage_options


def open_storage(
    uri: str, *, storage_options: dict[str, Any] | None = None, max_attempts: int = 5
) -> CheckpointStorage:
    """The storage at ``uri``: ``LocalStorage`` for paths, ``ObjectStorage`` for URLs.

    Raises:
        ConfigError: when the object store's fsspec driver is missing or rejects the URL.
    """
    if "://" not in uri or uri.startswith("file://"):
        return LocalStorage(Path(uri.removeprefix("file://")).expanduser().resolve())
    try:
        return ObjectStorage(uri, storage_options=storage_options, max_attempts=max_attempts)
    except ImportError as error:
        raise ConfigError(
            f"checkpoint.uri: {redact_url(uri)} needs an fsspec driver that is not installed "
            f"({error}); install it, e.g. pip install 'steadytrain[s3]'"
        ) from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"checkpoint.uri: {redact_url(uri)} is not usable ({error})") from None


def checkpoint_storage(config: Config) -> CheckpointStorage:
    """The storage named by ``checkpoint.uri`` (default ``RUN_DIR/checkpoints``).

    Raises:
        ConfigError: as ``open_storage``.
    """
    return open_storage_for(
        config.checkpoint.uri or str(Path(config.run_dir) / "checkpoints"), config
    )


def open_storage_for(uri: str, config: Config) -> CheckpointStorage:
    """The storage at ``uri`` with the run's storage options and retry policy."""
    return open_storage(
        uri,
        storage_options=usable_storage_options(config.checkpoint.storage_options),
        max_attempts=config.checkpoint.max_attempts,
    )
