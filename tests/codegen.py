"""Count the masked vector stores of a kernel compiled for AMD Zen 3, on any x86 host.

Conditional updates of an array (``a[i] = new if better else a[i]``, a running
maximum kept in place) compile to ``vmaskmovps``/``vmaskmovpd`` stores on AVX2
targets, which Zen 2/3 CPUs run as microcode (see ``compute.defects._flag``).
:func:`masked_stores` compiles a kernel's Python function for the signature
the pipeline calls it with, for ``znver3``, in a fresh process with an empty
numba cache, and counts them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

#: Compiles ``module.function`` for the signature ``SIG`` (numba types as ``t``,
#: ``a1``/``a2``: 1-D/2-D C arrays of a dtype) and prints its masked stores.
_SCRIPT = """
import importlib, re, sys
import numba
from numba import types as t
a1, a2 = (lambda d: t.Array(d, 1, "C")), (lambda d: t.Array(d, 2, "C"))
module, name, sig, parallel = sys.argv[1], sys.argv[2], eval(sys.argv[3]), sys.argv[4] == "1"
func = getattr(importlib.import_module(module), name).py_func
kernel = numba.njit(sig, parallel=parallel, nogil=True, error_model="numpy")(func)
asm = "".join(kernel.inspect_asm().values())
assert "vmovups" in asm or "vmovaps" in asm or "vmovupd" in asm, "no AVX code generated"
# AT&T operand order: a store's last operand is the memory address
print(len(re.findall(r"vmaskmovp[sd]\\s+%[xy]mm\\d+,\\s*%[xy]mm\\d+,\\s*[^%\\s]", asm)))
"""

x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="checks x86 code generation (numba compiles for the host CPU family)")


def masked_stores(module: str, name: str, signature: str, cache: Path, *,
                  parallel: bool = True) -> int:
    """Masked stores in ``module.name`` compiled for Zen 3 with ``signature`` (source text)."""
    env = {**os.environ, "NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": "",
           "NUMBA_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, module, name, signature,
                          "1" if parallel else "0"],
                         env=env, check=True, capture_output=True, text=True, timeout=600)
    return int(out.stdout.split()[-1])
