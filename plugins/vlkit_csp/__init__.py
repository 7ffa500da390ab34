"""vlkit csp plugin."""
