"""The embedded default world: Fashion-MNIST at 32x32, class prompts, tiny SDXL/SD3-architecture models."""
