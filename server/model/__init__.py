"""Model preparation and checks: turn the shipped GGUF (or a user's model) into the served 4-bit checkpoint, and check the served engine against a reference."""
