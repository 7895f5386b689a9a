"""core layer (docs/architecture.md)."""
