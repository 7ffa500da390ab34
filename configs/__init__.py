"""vlkit configs, installed as the package vlkit.configs so that `vlkit` runs from any directory."""
