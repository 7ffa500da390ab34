"""vlkit ufo plugin."""
