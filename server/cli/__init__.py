"""The `retroserve` command line: the entry point and the `generate` client command."""
