"""Compiles a C++ FFI kernel on first use, caches the library, registers its handlers.

The library is built for this machine (``-march=native``) into a cache keyed by the
source and the headers beside it, the compiler flags, jaxlib's version and the CPU's
feature flags, written to a temporary name and renamed into place, so concurrent first
uses (pytest-xdist workers) never load a half-written file. ``DEEPSEEK_JAX_KERNEL_CACHE``
moves the cache (default: ``$XDG_CACHE_HOME/deepseek_jax`` or ``~/.cache/deepseek_jax``).
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

CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    env = os.environ.get("DEEPSEEK_JAX_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepseek_jax"


def _cpu_flags() -> str:
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


def _compile(cxx: str, source: Path, lib_path: Path) -> None:
    """Compiles to a temporary file beside ``lib_path``, then renames it into place."""
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    includes = [f"-I{jax.ffi.include_dir()}", f"-I{source.parent}"]
    cmd = [cxx, *CXX_FLAGS, *includes, str(source), "-o", tmp]
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


@functools.cache
def load(source: Path, handlers: tuple[str, ...], prefix: str) -> ctypes.CDLL:
    """Builds (once per machine) and loads ``source``; registers each exported handler
    symbol ``H`` as the FFI target ``prefix + H`` on the CPU platform."""
    cxx = _compiler()
    key = hashlib.sha256(
        "\n".join(
            [
                source.read_text(),
                *(h.read_text() for h in sorted(source.parent.glob("*.h"))),
                " ".join(CXX_FLAGS),
                cxx,
                jaxlib.__version__,
                _cpu_flags(),
            ]
        ).encode()
    ).hexdigest()[:16]
    lib_path = cache_dir() / f"{source.stem}-{key}.so"
    if not lib_path.exists():
        try:
            _compile(cxx, source, lib_path)
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


PREFIX = "deepseek_jax_"  # FFI target names: PREFIX + handler symbol


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The FFI handlers of one C++ source, built and registered on first use."""

    source: Path
    handlers: tuple[str, ...]

    def load(self) -> None:
        load(self.source, self.handlers, PREFIX)

    def available(self) -> bool:
        """True when it compiles and loads here (and jax runs on CPU)."""
        if jax.default_backend() != "cpu":
            return False
        try:
            self.load()
        except KernelBuildError:
            return False
        return True

    def call(self, handler: str, result_shapes):
        """``jax.ffi.ffi_call`` of ``handler`` (built first), looped under ``vmap``."""
        if handler not in self.handlers:
            raise ValueError(f"{self.source.name} has no handler {handler!r}")
        self.load()
        return jax.ffi.ffi_call(PREFIX + handler, result_shapes, vmap_method="sequential")
