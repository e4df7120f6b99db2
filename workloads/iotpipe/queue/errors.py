"""Exceptions raised by the persistent queue."""

from __future__ import annotations

__all__ = ["QueueClosed", "QueueCorrupted", "QueueError", "QueueFull", "QueueLocked"]


class QueueError(Exception):
    """Base class of every queue error (also raised once an I/O error has poisoned a queue)."""


class QueueFull(QueueError):
    """Not enough free capacity for the whole batch within the allowed wait."""


class QueueCorrupted(QueueError):
    """Durable data failed its checks; names the file and byte offset. Never skipped."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"queue data corrupted in {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class QueueLocked(QueueError):
    """Another process (or another open in this process) holds the queue directory."""


class QueueClosed(QueueError):
    """The queue was closed; open it again to use it."""
