"""Serving what you train: a KV-cache engine with continuous batching behind an
OpenAI-compatible HTTP server.

`engine.py` (KV cache, prefill buckets, the compiled decode step), `forward.py` (the
transformer's forward against the cache), `sampling.py` (per-slot temperature / top-k / top-p,
keys from seed and position), `scheduler.py` (the host loop: admission, streaming, stops,
cancellation), `server.py` (FastAPI app: OpenAI schemas, SSE, metrics), `cli.py`
(`python -m infra serve`: start-up, SIGTERM drain). Importing this package imports nothing.
"""
