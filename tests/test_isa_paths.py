"""The int8, block and activation-sparse 4-bit kernels on every multiply-add kind narrower
than this CPU's best.

The kernels are compiled for one kind, chosen at import (`kernels_cpu.simd.host_kind`), so the
AVX2 and portable paths never run on an AVX-512 machine unless asked: LAMINA_ISA picks one in a
fresh process, which reruns the int8, block-format and activation-sparse matmul tests (numpy
references, GEMM rows equal to GEMV rows bit for bit) on it. The kinds wider than this CPU are checked for their
instructions in test_simd and test_block_formats instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels_cpu import simd

NARROWER = simd.KINDS[simd.KINDS.index(simd.best_kind()) + 1 :]
ROOT = Path(__file__).resolve().parent.parent


# The kernel tests each kind reruns: the int8 matmuls, the block formats' and int4 skipping's.
SUITES = {"int8": ("tests/test_kernels_cpu.py", "w8"),
          "blocks": ("tests/test_block_formats.py", "matmul or batched"),
          "colskip4": ("tests/test_colskip_blocks.py", "matmul or prologue or read or nan")}  # fmt: skip


@pytest.mark.parametrize("suite", sorted(SUITES))
@pytest.mark.parametrize("kind", NARROWER)
def test_matmul_tests_pass_on_a_narrower_kind(kind, suite):
    env = {**os.environ, simd.ISA_ENV: kind}
    path, selection = SUITES[suite]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path,
         "-k", selection],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout


def test_the_kind_in_use_follows_lamina_isa():
    probe = "from kernels_cpu.matmul_int8 import KIND; print(KIND)"
    env = {**os.environ, simd.ISA_ENV: "portable"}
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.stdout.strip() == "portable", run.stderr[-2000:]


def test_a_kind_wider_than_the_cpu_or_unknown_is_refused(monkeypatch):
    monkeypatch.setenv(simd.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="not a kind"):
        simd.host_kind()
    wider = simd.KINDS[: simd.KINDS.index(simd.best_kind())]
    for kind in wider:
        monkeypatch.setenv(simd.ISA_ENV, kind)
        with pytest.raises(ValueError, match="this CPU runs at most"):
            simd.host_kind()
