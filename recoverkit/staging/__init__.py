"""recoverkit.staging (grows with later capabilities)."""
