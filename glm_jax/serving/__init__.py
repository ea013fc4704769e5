"""Serving: continuous batching over KV-cache slots, and the HTTP server."""
