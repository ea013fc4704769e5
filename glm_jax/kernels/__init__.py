"""Attention implementations. ``reference`` is the XLA numerical reference for every kernel."""
