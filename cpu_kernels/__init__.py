"""Our own XLA:CPU kernels in C++, called through the XLA FFI.

``grouped_gemm``: the grouped (per-expert) GEMMs of the MoE layer on CPU, where XLA has
none. ``attention``: MLA's causal attention core, fused (XLA:CPU runs it as small batched
dots plus separate softmax passes). Both share ``tiles.h``; each is compiled on first use
with the machine's C++ compiler and cached (``build.py``); ``available()`` says whether
that worked here.
"""
