"""Flax NNX models: CLIP vision tower, LLaMA decoder, projectors and LLaVA."""
