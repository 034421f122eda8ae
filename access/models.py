"""Access credentials (filled in by the access issues)."""
