"""Schemas: the registry (KV `kaya_schemas`), compatibility checks, the catalog, contract tests."""
