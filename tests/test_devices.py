"""Devices: the tests' device switch, and no CPU-only calls on tensors that may live on a GPU."""

import os
import re
from pathlib import Path

import torch

from conftest import DEVICE

PACKAGE = Path(__file__).resolve().parent.parent / "funcpatch"


def test_the_switch_defaults_to_the_cpu():
    want = os.environ.get("FUNCPATCH_TEST_DEVICE", "cpu")
    assert DEVICE == torch.device(want)


def test_numpy_only_after_cpu():
    """``Tensor.numpy()`` fails on CUDA tensors: every call in the package must come right
    after ``.cpu()`` (prompt hashing, ACDC's circuit keys and the like)."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"\.numpy\(\)", line):
                if not re.search(r"\.cpu\(\)(\.contiguous\(\))?$", line[:m.start()]):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)
