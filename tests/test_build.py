"""The native build: each kernel set holds only its own instructions, whatever the build flags."""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from minigpt2.decode.native import native_available

# AVX-512's marks in a disassembly: its registers (zmm, k masks, ymm16-31), its broadcasts, and
# instructions AVX2 does not have
AVX512 = re.compile(r"zmm|%k[1-7]|ymm(1[6-9]|2[0-9]|3[01])|vpternlog|vmovdq[au](64|32)|\{1to")


NEEDS_TOOLS = pytest.mark.skipif(
    platform.machine() != "x86_64" or not (shutil.which("objdump") and shutil.which("cc")),
    reason="needs x86-64 with a C compiler and objdump",
)


@pytest.fixture(scope="module")
def built_with_user_cflags(tmp_path_factory) -> Path:
    """The extension as setup.py builds it under a user's CFLAGS that enable AVX-512 everywhere
    and ask for -fwrapv (as Python's own CFLAGS do; a CFLAGS variable replaces those), with -g
    so that the library records its flags."""
    tmp = tmp_path_factory.mktemp("build")
    env = {**os.environ, "CFLAGS": "-march=skylake-avx512 -fwrapv -g"}
    build = [sys.executable, "setup.py", "-q", "build_ext", "--force"]
    build += ["-b", str(tmp / "lib"), "-t", str(tmp / "tmp")]
    result = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return next((tmp / "lib").rglob("_native*.so"))


@NEEDS_TOOLS
def test_avx2_kernels_hold_no_avx512_instruction_whatever_the_cflags(built_with_user_cflags):
    """Built with a user's CFLAGS that enable AVX-512 everywhere: before, the AVX2 kernels held
    186 AVX-512 instructions and would have crashed a CPU with AVX2 alone."""
    library = built_with_user_cflags
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True
    ).stdout
    avx2, avx512, current = [], [], None
    for line in listing.splitlines():
        label = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if label:
            name = label.group(1)
            current = avx2 if "avx2" in name else avx512 if "avx512" in name else None
        elif current is not None:
            current.append(line)
    assert avx2 and avx512, "the kernels of both sets are in the library"
    assert [ln for ln in avx2 if AVX512.search(ln)] == []
    assert any(AVX512.search(ln) for ln in avx512)  # the check sees AVX-512 where it is


@NEEDS_TOOLS
@pytest.mark.skipif(not shutil.which("readelf"), reason="needs readelf")
def test_the_kernels_are_compiled_without_wrapv_whatever_the_cflags(built_with_user_cflags):
    """-fwrapv (in Python's own CFLAGS, which setuptools puts first) made a gpt2 float32 step
    1.09-1.21x slower: the flags GCC records in the library's debug information end with
    -fno-wrapv. Skips where the build keeps no such record (no -g)."""
    info = subprocess.run(
        ["readelf", "--debug-dump=info", str(built_with_user_cflags)],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    producers = re.findall(r"DW_AT_producer\s*:.*?(GNU C.*)", info)
    if not producers:
        pytest.skip("no DW_AT_producer in the library (built without -g)")
    for producer in producers:
        flags = [f for f in producer.split() if f in ("-fwrapv", "-fno-wrapv")]
        assert flags and flags[-1] == "-fno-wrapv", producer


@pytest.mark.skipif(not native_available(), reason="native decoder not built, or no AVX2")
def test_one_openmp_runtime_is_mapped():
    """native.c's threads are torch's pool: the dynamic loader hands the library's libgomp.so.1
    to the copy torch loaded (same soname), so after a native step one OpenMP runtime is
    mapped, torch's. A second would fight torch's pool for the cores."""
    script = (
        "import torch, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_native import odd_model, steps\n"
        "from minigpt2.decode.native import NativeDecoder, native_available\n"
        "assert native_available(), 'not built'\n"
        "model = odd_model()\n"
        "steps(model, NativeDecoder(model), torch.randint(0, 37, (1, 6)), 3)\n"
        "runtimes = {line.split()[-1] for line in open('/proc/self/maps')\n"
        "            if any(n in line for n in ('libgomp', 'libiomp', 'libomp'))}\n"
        "print('\\n'.join(sorted(runtimes)))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    runtimes = child.stdout.split()
    assert len(runtimes) == 1, runtimes
    assert Path(runtimes[0]).resolve().is_relative_to(Path(torch.__file__).parent.resolve())
