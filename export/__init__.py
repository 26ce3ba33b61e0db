"""Export trained checkpoints to ONNX, verify them against PyTorch, and write a Triton
model repository (`model_repository/`) that both serving backends read.

Torch is imported here (and in zoo/), never in services/.
"""
