"""Compiles a C++ FFI kernel on first use, caches the library, registers its handlers.

One library per build *variant*: ``native`` (``-march=native``: the tiles of this CPU's
widest vectors), and the fixed instruction sets ``avx512`` (x86-64-v4), ``avx2``
(x86-64-v3: what AMD Zen 2/3 and many cloud CPUs have) and ``portable`` (no ISA-specific
tile), so that every variant a user's CPU might get is built and tested on this one
(``runnable_variants``). The model uses ``default_variant()``: ``native`` unless
``DEEPSEEK_JAX_KERNEL_VARIANT`` names another (e.g. ``avx2`` to measure an AVX2 machine's
build here).

The library goes into a cache keyed by the source and the headers beside it, the
variant's compiler flags, jaxlib's version and the CPU's feature flags, written to a
temporary name and renamed into place, so concurrent first uses (pytest-xdist workers)
never load a half-written file. ``DEEPSEEK_JAX_KERNEL_CACHE`` moves the cache (default:
``$XDG_CACHE_HOME/deepseek_jax`` or ``~/.cache/deepseek_jax``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")


@dataclasses.dataclass(frozen=True)
class Variant:
    """A build of the kernels for one instruction set."""

    name: str
    flags: tuple[str, ...]  # compiler flags beyond CXX_FLAGS
    needs: frozenset[str] = frozenset()  # /proc/cpuinfo flags the code executes


_X86_V3 = frozenset({"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm"})
_X86_V4 = _X86_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
NATIVE = Variant("native", ("-march=native",))
VARIANTS = {
    v.name: v
    for v in (
        NATIVE,
        Variant("avx512", ("-march=x86-64-v4",), _X86_V4),
        Variant("avx2", ("-march=x86-64-v3",), _X86_V3),
        Variant("portable", ("-DDSJ_PORTABLE",)),
    )
}
_X86_ONLY = ("avx512", "avx2")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def runnable_variants() -> tuple[str, ...]:
    """The variants this machine can build and execute (every x86 one its CPU supports)."""
    flags = set(cpu_flags().split())
    return tuple(
        name
        for name, v in VARIANTS.items()
        if (name not in _X86_ONLY or _is_x86()) and v.needs <= flags
    )


def default_variant() -> str:
    """``DEEPSEEK_JAX_KERNEL_VARIANT`` if set (and known), else ``native``."""
    name = os.environ.get("DEEPSEEK_JAX_KERNEL_VARIANT", "native")
    if name not in VARIANTS:
        raise KernelBuildError(
            f"DEEPSEEK_JAX_KERNEL_VARIANT={name!r}: choose one of {sorted(VARIANTS)}"
        )
    return name


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    env = os.environ.get("DEEPSEEK_JAX_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepseek_jax"


@functools.cache
def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    tried = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++"]
    for name in tried:
        if path := shutil.which(name):
            return path
    raise KernelBuildError(f"no C++ compiler found (tried {', '.join(tried)}; set CXX)")


def _compile(cxx: str, source: Path, lib_path: Path, flags: tuple[str, ...]) -> None:
    """Compiles to a temporary file beside ``lib_path``, then renames it into place."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    includes = [f"-I{jax.ffi.include_dir()}", f"-I{source.parent}"]
    cmd = [cxx, *CXX_FLAGS, *flags, *includes, str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise KernelBuildError(
                f"compiling {source.name} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
            )
        os.replace(tmp, lib_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _source_hash(source: Path) -> str:
    texts = [source.read_text(), *(h.read_text() for h in sorted(source.parent.glob("*.h")))]
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


@functools.cache
def load(
    source: Path, handlers: tuple[str, ...], prefix: str, variant: Variant = NATIVE
) -> ctypes.CDLL:
    """Builds (once per machine and variant) and loads ``source``; registers each exported
    handler symbol ``H`` as the FFI target ``prefix + H`` on the CPU platform."""
    cxx = _compiler()
    key = hashlib.sha256(
        "\n".join(
            [
                source.read_text(),
                *(h.read_text() for h in sorted(source.parent.glob("*.h"))),
                " ".join(CXX_FLAGS + variant.flags),
                cxx,
                jaxlib.__version__,
                cpu_flags(),
            ]
        ).encode()
    ).hexdigest()[:16]
    lib_path = cache_dir() / f"{source.stem}-{variant.name}-{key}.so"
    if not lib_path.exists():
        try:
            _compile(cxx, source, lib_path, variant.flags)
        except OSError as e:  # unwritable cache, compiler that cannot run, ...
            raise KernelBuildError(f"building {source.name} into {lib_path} failed: {e}") from e
    try:
        lib = ctypes.cdll.LoadLibrary(str(lib_path))
    except OSError as e:
        raise KernelBuildError(f"loading {lib_path} failed: {e}") from e
    for name in handlers:
        jax.ffi.register_ffi_target(
            prefix + name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
        )
    return lib


PREFIX = "deepseek_jax_"  # FFI target names: PREFIX + variant + "_" + handler symbol


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The FFI handlers of one C++ source, built and registered on first use per variant
    (``None``: ``default_variant()``)."""

    source: Path
    handlers: tuple[str, ...]

    def load(self, variant: str | None = None) -> ctypes.CDLL:
        name = variant or default_variant()
        if name not in VARIANTS:
            raise KernelBuildError(f"unknown kernel variant {name!r}; one of {sorted(VARIANTS)}")
        return load(self.source, self.handlers, f"{PREFIX}{name}_", VARIANTS[name])

    def available(self, variant: str | None = None) -> bool:
        """True when it compiles and loads here (and jax runs on CPU)."""
        if jax.default_backend() != "cpu":
            return False
        try:
            self.load(variant)
        except KernelBuildError:
            return False
        return True

    def build_error(self, variant: str | None = None) -> str | None:
        """Why the kernel does not build here, or None when it does."""
        try:
            self.load(variant)
        except KernelBuildError as e:
            return str(e)
        return None

    def identity(self, variant: str | None = None) -> str:
        """Names this build (source, variant, tiles): measured decisions key on it."""
        name = variant or default_variant()
        return f"{self.source.name}:{name}:{self.tile_config(name)}:{_source_hash(self.source)}"

    def tile_config(self, variant: str | None = None) -> str:
        """The instruction set and register tile the library was compiled with, e.g.
        ``"avx2 6x16"`` (tiles.h)."""
        fn = self.load(variant).DsjTileConfig
        fn.restype = ctypes.c_char_p
        return fn().decode()

    def call(self, handler: str, result_shapes, variant: str | None = None):
        """``jax.ffi.ffi_call`` of ``handler`` (built first), looped under ``vmap``."""
        if handler not in self.handlers:
            raise ValueError(f"{self.source.name} has no handler {handler!r}")
        name = variant or default_variant()
        self.load(name)
        return jax.ffi.ffi_call(
            f"{PREFIX}{name}_{handler}", result_shapes, vmap_method="sequential"
        )
