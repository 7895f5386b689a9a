"""pytest layer (docs/architecture.md)."""
