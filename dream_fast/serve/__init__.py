"""`dream-fast serve`: batched generation and embeddings over HTTP (docs/serving.md)."""
