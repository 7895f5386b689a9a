"""checks layer (docs/architecture.md)."""
