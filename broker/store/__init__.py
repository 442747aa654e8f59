"""Persistence of what a broker promised to keep.

Without a store the core's state lives only in memory (the default for an
embedded broker and for tests). With ``SqliteStore`` the core records every
change to what must survive a crash (sessions that outlive their connection,
their queues and messages in flight, retained messages, wills) in a
``Journal``, and the store commits it in batches before the acknowledgements
that promise it are sent.
"""

from .journal import Journal
from .records import RestoreReport, Snapshot, StoredSession, StoredWill
from .sqlite import SqliteStore, StoreError

__all__ = ["Journal", "RestoreReport", "Snapshot", "SqliteStore", "StoreError", "StoredSession",
           "StoredWill"]
