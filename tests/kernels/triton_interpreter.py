"""Import Triton for the kernel tests: on a machine without CUDA, in its CPU interpreter (``TRITON_INTERPRET=1``).

TRITON_INTERPRET is read whenever a function is decorated with ``@triton.jit``, Triton's own standard library
(``tl.max``, ``tl.sum``, ...) included, at ``import triton``. Anything may import Triton early (torch._dynamo does,
through transformers and peft), so the kernel test modules sort first in the default run and import this module
before anything else of theirs; where Triton was imported too early anyway, the module is skipped with the fix.
A module that imports this one is skipped without Triton installed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.max, InterpretedFunction):
        pytest.skip(
            "no CUDA, and Triton was imported before TRITON_INTERPRET=1 could be set: run with TRITON_INTERPRET=1",
            allow_module_level=True,
        )
