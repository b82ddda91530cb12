"""Builds minigpt2's optional native decoder (src/minigpt2/decode/native/native.c); everything else is in
pyproject.toml. Without a C compiler the build skips it and minigpt2 decodes in PyTorch."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "minigpt2.decode.native._native",
            sources=["src/minigpt2/decode/native/native.c"],
            depends=[f"src/minigpt2/decode/native/native{part}.h" for part in ("", "_kernels", "_simd")],
            extra_compile_args=["-O3", "-std=c11", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,  # a failed build leaves the pure-PyTorch decoder
        )
    ]
)
