"""Compiled CPU kernels for funcpatch's own forward when nothing records it (no autograd,
no torch.func transform), built on first use (``kernels.c``):

- :func:`slot_projection`: a layer's Q/K/V slot inputs mixed from the source
  differences, RMS-normed and projected, tile by tile of tokens, so that the ``[slots,
  tokens, d]`` inputs never go to memory. It serves small models (each layer's slot
  weights must fit in a core's cache, :func:`fits`).
- :func:`head_outputs`: the heads' differences ``patch - z W_O`` and the attention
  output (their products summed) from one product per head, tile by tile of rows.

On the Llama benchmark of ``benchmarks/architectures.py`` the two take ~2.5 ms off a
~29 ms per-query-head patched forward. Calls they do not serve take the plain path,
which gives the same values up to float rounding.

Global state, per process: the loaded library, or the reason there is none
(:func:`status`). The library is compiled once per machine with the C compiler ``CC``
(else ``cc``/``gcc``) against the MKL that torch links, into
``$FUNCPATCH_CACHE/kernels`` (default ``~/.cache/funcpatch/kernels``), under a name keyed
by the source, flags, compiler, CPU and torch build. It is written to a temporary file
and renamed into place, so a build that fails or is interrupted leaves nothing a later
load would use. Without a compiler, or with ``FUNCPATCH_KERNELS=0`` (read at every
call), the forward takes its plain path; why a build failed is logged once (logger
``funcpatch.kernels``, INFO) and kept in :func:`status`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import logging
import threading
from typing import Optional, Union

import torch

SOURCE = os.path.join(os.path.dirname(__file__), "kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
TILE_BYTES = 384 << 10  # one tile's mixed inputs, per thread: within a core's L2 with the weights
WEIGHT_BYTES = 1 << 20  # a layer's slot weights, read for every tile: kept in cache
_INT_MAX = 2 ** 31 - 1  # MKL's sgemm takes 32-bit sizes

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_library: Union[None, ctypes.CDLL, str] = None  # the library, or why there is none (once tried)


def enabled() -> bool:
    """Whether the kernels may be used: ``FUNCPATCH_KERNELS`` unset or ``1``; ``0`` turns
    them off (any other value is an error, not a guess)."""
    value = os.environ.get("FUNCPATCH_KERNELS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"FUNCPATCH_KERNELS must be 0 (off) or 1 (on, the default), got {value!r}")
    return value == "1"


def available() -> bool:
    """Whether the kernels are on and their library is loaded (built now if not yet tried)."""
    return enabled() and isinstance(_load(), ctypes.CDLL)


def status() -> str:
    """``"loaded: PATH"``, ``"off: ..."`` or ``"unavailable: REASON"`` (builds if not yet tried)."""
    if not enabled():
        return "off: FUNCPATCH_KERNELS=0"
    lib = _load()
    return f"loaded: {lib._name}" if isinstance(lib, ctypes.CDLL) else f"unavailable: {lib}"


def fits(n_slots: int, d: int, d_head: int) -> bool:
    """Whether :func:`slot_projection` serves a layer of ``n_slots`` projections ``d -> d_head``
    (float32): its weights fit :data:`WEIGHT_BYTES` and a tile holds at least 4 tokens."""
    return n_slots * d * d_head * 4 <= WEIGHT_BYTES and _tile(n_slots, d) >= 4


def _tile(n_slots: int, d: int) -> int:
    """Tokens per tile: at most 16 (measured on the Llama benchmark, both graph forms:
    8 and 32 are 0.2-1.1 ms slower per forward), fewer where the slots' inputs would
    pass :data:`TILE_BYTES`."""
    return min(16, TILE_BYTES // (n_slots * d * 4))


def slot_projection(rows: torch.Tensor, mix: torch.Tensor, weight: torch.Tensor, eps: float,
                    out: torch.Tensor) -> bool:
    """``out[s, t] = x @ weight[s] / sqrt(mean(x * x) + eps)`` with ``x = sum_r mix[s, r] rows[r, t]``.

    ``rows [n_rows, tokens * d]`` (rows may be strided, the rest contiguous), ``mix [slots,
    n_rows]``, ``weight [slots, d, d_head]``, ``out [slots, tokens, d_head]``: float32 on the
    CPU. Returns False, writing nothing, when the kernels are off or unavailable or the
    sizes do not :func:`fits`; True once ``out`` is written."""
    n_slots, d, d_head = weight.shape
    if not (enabled() and fits(n_slots, d, d_head)):
        return False
    n_rows, tokens = rows.shape[0], out.shape[1]
    _check_float32_cpu("slot_projection", rows=rows, mix=mix, weight=weight, out=out)
    if (rows.shape[1] != tokens * d or tuple(mix.shape) != (n_slots, n_rows)
            or tuple(out.shape) != (n_slots, tokens, d_head) or rows.stride(1) != 1
            or not (mix.is_contiguous() and weight.is_contiguous() and out.is_contiguous())):
        raise ValueError(f"slot_projection: rows {tuple(rows.shape)} (stride {rows.stride()}), mix {tuple(mix.shape)}, "
                         f"weight {tuple(weight.shape)}, out {tuple(out.shape)} do not fit: want rows [n_rows, "
                         "tokens * d] with unit column stride, mix [slots, n_rows], weight [slots, d, d_head], "
                         "out [slots, tokens, d_head], the last three contiguous")
    ld_rows = rows.stride(0) if n_rows > 1 else tokens * d  # (a dim of size 1 may have any stride)
    if min(n_rows, n_slots, d, d_head) < 1 or ld_rows < tokens * d:
        raise ValueError(f"slot_projection: rows {tuple(rows.shape)} (stride {rows.stride()}), mix {tuple(mix.shape)}, "
                         f"weight {tuple(weight.shape)}: want at least one row, slot and feature, rows not overlapping")
    if max(ld_rows, tokens * d, n_rows) > _INT_MAX:
        return False
    lib = _load()
    if not isinstance(lib, ctypes.CDLL):
        return False
    code = lib.funcpatch_slot_projection(rows.data_ptr(), ld_rows, n_rows, mix.data_ptr(), n_slots,
                                         weight.data_ptr(), d, d_head, tokens, eps, _tile(n_slots, d),
                                         torch.get_num_threads(), out.data_ptr())
    if code != 0:
        raise MemoryError("slot_projection could not allocate its per-thread buffers")
    return True


def head_outputs(patch: torch.Tensor, z: torch.Tensor, w: torch.Tensor, diff: torch.Tensor) -> Optional[torch.Tensor]:
    """``diff[h] = patch[h] - z[h] @ w[h]`` written in place, and the heads' sum
    ``sum_h z[h] @ w[h]`` returned ``[rows, d]``; None, writing nothing, when the kernels
    are off or unavailable.

    ``patch``/``diff [heads, rows, d]`` and ``z [heads, rows, d_head]`` contiguous, ``w [heads,
    d_head, d]`` with a unit stride in one of its last two dims (the model's ``W_O`` as
    ``o_proj.weight.t().view(heads, d_head, d)`` has one); float32 on the CPU."""
    if not enabled():
        return None
    n_heads, rows, d = patch.shape
    d_head = z.shape[-1]
    _check_float32_cpu("head_outputs", patch=patch, z=z, w=w, diff=diff)
    # each w[h] as BLAS takes it: one of its strides 1, the other at least that dim (a dim
    # of size 1 may have any stride)
    w_k, w_j = (1 if d_head == 1 else w.stride(1)), (1 if d == 1 else w.stride(2))
    blas = (w_k == 1 and w_j >= d_head) or (w_j == 1 and w_k >= d)
    if (tuple(z.shape) != (n_heads, rows, d_head) or tuple(w.shape) != (n_heads, d_head, d)
            or tuple(diff.shape) != (n_heads, rows, d) or not blas
            or not (patch.is_contiguous() and z.is_contiguous() and diff.is_contiguous())):
        raise ValueError(f"head_outputs: patch {tuple(patch.shape)}, z {tuple(z.shape)}, w {tuple(w.shape)} (stride "
                         f"{w.stride()}), diff {tuple(diff.shape)} do not fit: want patch and diff [heads, rows, d], "
                         "z [heads, rows, d_head], contiguous, and w [heads, d_head, d] with a unit stride in its "
                         "last two dims")
    if min(n_heads, d, d_head) < 1:
        raise ValueError(f"head_outputs: patch {tuple(patch.shape)}, z {tuple(z.shape)}: want at least one head, "
                         "feature and head feature")
    if max(w_k, w_j) > _INT_MAX:
        return None
    lib = _load()
    if not isinstance(lib, ctypes.CDLL):
        return None
    # rows per tile: one head's product within a core's L2 (not by thread count: the same
    # tiles, and bits, with any number of threads)
    tile = max(16, (256 << 10) // (4 * d))
    summed = patch.new_empty((rows, d))
    code = lib.funcpatch_head_outputs(patch.data_ptr(), z.data_ptr(), w.data_ptr(), w.stride(0), w_k, w_j, n_heads,
                                      rows, d_head, d, tile, torch.get_num_threads(), diff.data_ptr(),
                                      summed.data_ptr())
    if code != 0:
        raise MemoryError("head_outputs could not allocate its per-thread buffers")
    return summed


def _check_float32_cpu(kernel: str, **tensors: torch.Tensor) -> None:
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors.values()):
        raise ValueError(f"{kernel} takes float32 CPU tensors; got "
                         + ", ".join(f"{k} {t.dtype} on {t.device}" for k, t in tensors.items()))


def _load() -> Union[ctypes.CDLL, str]:
    """The library (built if needed), or why there is none; tried once per process."""
    global _library
    with _lock:
        if _library is None:
            try:
                _library = _open(_build())
            except _Unavailable as e:
                _library = str(e)
                # not a warning: results are the same, and notebooks and the CLI keep a clean stderr
                _log.info("compiled CPU kernels unavailable (%s); funcpatch's own forward takes its plain path "
                          "(same results, slower). Set FUNCPATCH_KERNELS=0 to not try.", e)
        return _library


class _Unavailable(Exception):
    pass


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise _Unavailable("no C compiler: set CC, or install gcc")
    return cc


def _build() -> str:
    """The library's path, compiled now unless a build with the same key is in the cache."""
    if platform.system() != "Linux" or not torch.backends.mkl.is_available():
        raise _Unavailable("they are built on Linux against the MKL that torch links; this torch has "
                           f"{'MKL' if torch.backends.mkl.is_available() else 'no MKL'} on {platform.system()}")
    cc = _compiler()
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _Unavailable(f"the C compiler {cc!r} does not run: {e}") from None
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(), version.encode(),
                                     torch.__version__.encode(), torch_lib.encode(), _cpu().encode()])).hexdigest()[:16]
    cache = os.environ.get("FUNCPATCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "funcpatch")
    root = os.path.join(cache, "kernels")
    path = os.path.join(root, f"kernels-{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"kernels-{key}.", suffix=".tmp", dir=root)
        os.close(fd)
    except OSError as e:
        raise _Unavailable(f"cannot write to the kernel cache {root}: {e} (set FUNCPATCH_CACHE)") from None
    try:
        cmd = [cc, *FLAGS, "-o", tmp, SOURCE, f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise _Unavailable(f"{' '.join(cmd)} failed: {e}") from None
        if done.returncode != 0:
            raise _Unavailable(f"{' '.join(cmd)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # whole, or not there
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _cpu() -> str:
    """What ``-march=native`` compiled for: the machine and its CPU's feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return platform.machine() + flags


def _open(path: str) -> ctypes.CDLL:
    """Load the library and check it on a small case against torch (a BLAS with other
    conventions would give wrong numbers, not an error)."""
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise _Unavailable(f"cannot load {path}: {e}") from None
    fn = lib.funcpatch_slot_projection
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_int,
                   ctypes.c_void_p]
    heads = lib.funcpatch_head_outputs
    heads.restype = ctypes.c_int
    heads.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    g = torch.Generator().manual_seed(0)
    rows, mix = torch.randn(3, 7 * 8, generator=g), torch.randn(5, 3, generator=g)
    weight, out = torch.randn(5, 8, 4, generator=g), torch.empty(5, 7, 4)
    patch, z = torch.randn(3, 7, 8, generator=g), torch.randn(3, 7, 4, generator=g)
    w_o = torch.randn(8, 12, generator=g)
    w = w_o.t().view(3, 4, 8)  # (the layout the forward passes: a unit stride in d_head)
    diff, summed = torch.empty(3, 7, 8), torch.empty(7, 8)
    if (fn(rows.data_ptr(), rows.stride(0), 3, mix.data_ptr(), 5, weight.data_ptr(), 8, 4, 7, 1e-6, 4, 2,
           out.data_ptr()) != 0
            or heads(patch.data_ptr(), z.data_ptr(), w.data_ptr(), w.stride(0), w.stride(1), w.stride(2), 3, 7, 4, 8, 3,
                     2, diff.data_ptr(), summed.data_ptr()) != 0):
        raise _Unavailable(f"{path} failed its check")
    x = (mix @ rows).view(5, 7, 8)
    products = torch.bmm(z, w)
    checks = [(out, torch.bmm(x, weight) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
              (diff, patch - products), (summed, products.sum(0))]
    for got, want in checks:
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise _Unavailable(f"{path} gives wrong values (max error {(got - want).abs().max().item():.2e})")
    return lib
