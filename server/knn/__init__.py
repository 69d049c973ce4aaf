"""The kNN-LM model class and its speed techniques, loaded inside vLLM's engine processes (no gRPC code)."""
