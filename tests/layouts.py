"""Array layouts for tests, by logical axis name (the rules table maps them to the mesh), so
tests name no physical mesh axis (STYLE: those live in ``mesh.py`` and ``sharding.py``)."""

from jax.sharding import PartitionSpec as P

from deepseek_jax.sharding import logical_to_spec


def spec(*names: str | None) -> P:
    """``PartitionSpec`` of logical ``names``, e.g. ``spec("batch", None)``: the batch over
    every data-parallel device."""
    return logical_to_spec(names)


def axes(name: str) -> str | tuple[str, ...] | None:
    """The mesh axes logical axis ``name`` shards over, as a spec entry."""
    return spec(name)[0]
