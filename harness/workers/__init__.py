"""workers layer (docs/architecture.md)."""
