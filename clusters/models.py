"""Virtual clusters (filled in by the clusters issue)."""
