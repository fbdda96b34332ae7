"""Inference: paged KV cache, continuous batching engine, sampling, tool use, CLI and servers.

Not built yet: arrives with its issue; this package exports nothing until then.
"""
