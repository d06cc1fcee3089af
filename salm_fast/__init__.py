"""salm-fast."""
