"""DeepSeek-V3 in JAX. ``from_pretrained`` / ``save_pretrained`` load lazily (importing the
package stays cheap: no JAX until they are used)."""

__all__ = ["from_pretrained", "save_pretrained"]


def __getattr__(name: str):
    if name in __all__:
        import deepseek_jax.interop.pretrained as pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'deepseek_jax' has no attribute {name!r}")
