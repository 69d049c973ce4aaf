"""Reading published datastores: open, encode queries, batched search, caches, async batching."""

from retriever.datastore import (  # noqa: F401
    BatchResults,
    Datastore,
    DatastoreError,
    FingerprintMismatch,
    Neighbour,
    Timing,
)
