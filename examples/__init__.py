"""Example apps tested by the harness unchanged, each through its own Target."""
