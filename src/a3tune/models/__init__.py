"""Med-LVLMs: loading and building LLaVA-family models, image-token geometry, attention capture."""
