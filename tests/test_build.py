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


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not (shutil.which("objdump") and shutil.which("cc")),
    reason="needs x86-64 with a C compiler and objdump",
)
def test_avx2_kernels_hold_no_avx512_instruction_whatever_the_cflags(tmp_path):
    """Built with a user's CFLAGS that enable AVX-512 everywhere: before, the AVX2 kernels held
    186 AVX-512 instructions and would have crashed a CPU with AVX2 alone."""
    env = {**os.environ, "CFLAGS": "-march=skylake-avx512"}
    build = [sys.executable, "setup.py", "-q", "build_ext", "--force"]
    build += ["-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")]
    result = subprocess.run(build, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    library = next((tmp_path / "lib").rglob("_native*.so"))
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
