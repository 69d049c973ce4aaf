"""Observability: Prometheus metrics and structured logging."""
