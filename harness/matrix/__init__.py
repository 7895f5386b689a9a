"""matrix layer (docs/architecture.md)."""
