"""recoverkit.health (grows with later capabilities)."""
