"""vlkit retrieval plugin."""
