"""Probe: what naming a call site costs per call, for a site in a short and in a long function.

Run from the repository root: ``TYPEDCOLL_PURE_PYTHON=1 python bench/results/site-lookup/probe.py``
(``PYTHONPATH=<other checkout>/src`` measures another commit). Prints µs per call, best of 7
repeats of 20,000 calls, of ``site_fingerprint`` (every call on the Python steps) and of the NCCL
path's ``pack_block`` (every CUDA tensor call's envelope; CPU tensors here, no GPU needed).
"""

import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_torch import _FakeProtocol  # noqa: E402

from typedcoll.core.identity import site_fingerprint  # noqa: E402
from typedcoll.tensor import device  # noqa: E402
from typedcoll.tensor.envelope import BLOCK, tensor_call  # noqa: E402


def engine_like(lines: int):
    """A function of ``lines`` statements that makes one broadcast_tensor call record."""
    src = ("def step(p, t):\n" + "".join(f"    y{i} = {i}\n" for i in range(lines)) +
           "    call = tensor_call(p, 'broadcast_tensor', t, '', None, root=0)\n"
           "    f = sys._getframe()\n"
           "    call.code, call.lasti, call.seq, call.occurrence = f.f_code, f.f_lasti, 1, 1\n"
           "    return call\n")
    namespace = {"sys": sys, "tensor_call": tensor_call}
    exec(compile(src, f"/tmp/engine_like_{lines}.py", "exec"), namespace)
    return namespace["step"]


def best_us(fn) -> float:
    fn()
    return min(timeit.repeat(fn, number=20000, repeat=7)) / 20000 * 1e6


p = _FakeProtocol(0, 8)
buf = memoryview(bytearray(BLOCK))
for lines in (5, 400):
    call = engine_like(lines)(p, torch.zeros(4))
    print(f"function of {lines:3} lines: site_fingerprint "
          f"{best_us(lambda: site_fingerprint(call.code, call.lasti)):.2f} us, pack_block "
          f"{best_us(lambda: device.pack_block(buf, p, call)):.2f} us")
