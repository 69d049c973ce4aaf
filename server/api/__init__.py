"""The gRPC API and its hosting: servicers, request validation and conversion, auth, TLS, per-client limits, error mapping, server start-up."""
