"""The generation core: the only layer that imports torch, diffusers, transformers and accelerate."""
