"""Hugging Face interop: safetensors in and out, name/layout maps, the official FP8 format."""

from deepseek_jax.interop.pretrained import from_pretrained, save_pretrained

__all__ = ["from_pretrained", "save_pretrained"]
