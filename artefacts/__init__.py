"""What the project builds and how a prepared model is loaded: artefact paths, the 4-bit
checkpoint format, the checkpoint vLLM loads on this CPU, device detection and the token a
document starts after. The leaf of the project: it imports no other retroserve package, so the
server, the retriever and the datastore tools can all depend on it (import-linter checks this)."""
