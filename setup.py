"""Builds minigpt2's optional native decoder (src/minigpt2/decode/native/native.c); everything
else is in pyproject.toml. Without a C compiler the build skips it and minigpt2 decodes in
PyTorch."""

from setuptools import Extension, setup

NATIVE = "src/minigpt2/decode/native/"

setup(
    ext_modules=[
        Extension(
            "minigpt2.decode.native._native",
            sources=[NATIVE + "native.c"],
            depends=[f"{NATIVE}native{part}.h" for part in ("", "_kernels", "_simd")],
            # -march=x86-64 last, over any -march in the user's CFLAGS: each kernel set gets its
            # instructions from its own `#pragma GCC target`, so the AVX2 kernels hold no
            # AVX-512 instruction (which would crash an AVX2-only CPU) whatever the build flags.
            # -fno-wrapv over the -fwrapv of Python's own CFLAGS (sysconfig), which setuptools
            # puts first: with it the compiler may not assume an int index never overflows, and
            # a gpt2 float32 step ran 1.09-1.21x faster without it (BENCHMARKS.md, the kernels)
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-fopenmp",
                "-fno-wrapv",
                "-march=x86-64",
                "-mtune=generic",
            ],
            extra_link_args=["-fopenmp"],
            optional=True,  # a failed build leaves the pure-PyTorch decoder
        )
    ]
)
