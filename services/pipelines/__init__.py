"""Torch-free pipelines: each turns validated request parameters into pixels by calling
an InferenceBackend. They know nothing of HTTP."""
