"""Reading committed steps back: planning reads, resharding, verifying."""
