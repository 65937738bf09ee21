"""Our own XLA:CPU kernels in C++, called through the XLA FFI.

``grouped_gemm``: the grouped (per-expert) GEMMs of the MoE layer on CPU, where XLA has
none. Compiled on first use with the machine's C++ compiler and cached (``build.py``);
``grouped_gemm.available()`` says whether that worked here.
"""
