"""vlkit demos (installed as vlkit.demos)."""
