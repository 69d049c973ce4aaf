"""Reading published datastores: open, encode queries, batched search, caches, async batching.

Names are imported lazily so `retriever.fingerprints` stays cheap for callers that need only it.
"""

_EXPORTS = {
    "BatchResults": "retriever.datastore",
    "Datastore": "retriever.datastore",
    "DatastoreError": "retriever.datastore",
    "FingerprintMismatch": "retriever.datastore",
    "Neighbour": "retriever.datastore",
    "Timing": "retriever.datastore",
    "QueryEncoder": "retriever.encoder",
    "QueryCache": "retriever.cache",
    "CachedSearcher": "retriever.cache",
    "RetrievalBatcher": "retriever.batcher",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'retriever' has no attribute {name!r}")
