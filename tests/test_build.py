"""The native build: each kernel set holds only its own instructions, whatever the build flags."""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

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
