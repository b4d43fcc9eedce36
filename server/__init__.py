"""HTTP serving: settings, backends, dynamic batcher and the FastAPI app (never imports torch)."""
