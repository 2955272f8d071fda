"""Atomic directory writes and the directory lock: kept importable here; they live in `core.atomic`."""
from ..core.atomic import atomic_dir, exchange_dirs, fsync_files, link_or_copy, locked_dir  # noqa: F401
