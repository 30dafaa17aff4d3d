"""scannetpp source (being written)."""
