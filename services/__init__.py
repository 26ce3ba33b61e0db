"""genserve's serving path: runtime backends, torch-free pipelines, the BentoML service.

Nothing under services/ imports torch (a test enforces it)."""
