"""recoverkit.recovery (grows with later capabilities)."""
