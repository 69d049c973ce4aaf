"""The generation core: the vLLM engine wrapper, the retrieval-during-decoding loop, context layouts, datastore hot swap, per-request context."""
