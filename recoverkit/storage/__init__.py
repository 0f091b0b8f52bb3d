"""Storage tiers, the commit protocol, discovery, retention and the run lock."""
