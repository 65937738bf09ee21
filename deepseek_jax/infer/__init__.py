"""Inference: prefill and decode over the latent cache, generation."""
