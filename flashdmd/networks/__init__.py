"""Trainable networks beside the diffusion backbones: discriminators and reward models."""
