"""World and rank helpers, commit coordination and peer transport."""
