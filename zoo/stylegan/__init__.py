"""A small class-conditional StyleGAN-like generator for the digits (NVIDIA attribute names)."""
