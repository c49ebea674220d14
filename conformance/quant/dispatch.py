"""Which CPU code paths bitsandbytes and torch take on this machine, and one line naming them.

bitsandbytes' CPU backend dispatches on the instruction set (0.50.2, ``backends/cpu/ops.py`` and
``nn/modules.py``):

- with AVX512-BF16 (its native ``has_avx512bf16_cpu``), a ``Linear4bit`` repacks its weight in place on the
  first eval-mode, no-grad CPU forward (``_convert_weight_packed_for_cpu``), ``gemv_4bit`` gets a fused CPU
  kernel, and bitsandbytes tries to load the optional ``gemm_4bit_forward`` kernel from the Hugging Face Hub
  (``kernels.get_kernel("kernels-community/quantization-bitsandbytes")``: a download, so it cannot load
  offline; on failure it logs "Failed to load CPU gemm_4bit_forward from kernels-community: ...");
- with torch's CPU capability ``AVX512``, ``int8_linear_matmul`` is ``torch._int_mm`` and ``dequantize_4bit``
  falls back to the generic code for blocksize >= 2048.

``cpu_dispatch()`` records the features they dispatch on (``/proc/cpuinfo`` flags, torch's
``get_cpu_capability()``) and what bitsandbytes did; ``describe()`` is the one line every xfail or skip
message that depends on them includes (pure: it also formats a report's recorded dictionary).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

#: /proc/cpuinfo flags bitsandbytes and torch dispatch on
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
#: the kernel bitsandbytes 0.50 tries to load on AVX512-BF16 CPUs
BNB_CPU_KERNEL = "kernels-community/quantization-bitsandbytes gemm_4bit_forward"


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool] | None:
    """``CPU_FLAGS`` -> present, from ``/proc/cpuinfo`` (or the text given); None where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    line = next((ln for ln in cpuinfo.splitlines() if ln.split(":")[0].strip() in ("flags", "Features")), None)
    if line is None:
        return None
    have = set(line.split(":", 1)[1].split())
    return {f: f in have for f in CPU_FLAGS}


def _kernel_reason(bnb_version: str) -> str:
    """Why bitsandbytes' CPU kernel did not load although it was tried: its own warning if we kept it
    (``conformance.BNB_CPU_LOG``), else what we can tell."""
    import conformance

    said = [m for m in conformance.BNB_CPU_LOG.messages if "gemm_4bit_forward" in m]
    if said:
        return said[-1]
    if importlib.util.find_spec("kernels") is None:
        return "the `kernels` package is not installed (bitsandbytes needs kernels >= 0.11.1 for it)"
    return ("kernels.get_kernel('kernels-community/quantization-bitsandbytes') failed (a download from the "
            f"Hugging Face Hub: offline it cannot load; bitsandbytes {bnb_version} logged why before "
            "conformance was imported)")


def bnb_cpu_backend() -> dict[str, Any]:
    """What bitsandbytes' CPU backend chose here (imports bitsandbytes; ``{"error": ...}`` if it cannot)."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes import functional as F  # noqa: N812
    except Exception as exc:  # noqa: BLE001 - a fingerprint records, it never raises
        return {"error": f"bitsandbytes not importable: {type(exc).__name__}: {exc}"}
    version = getattr(bnb, "__version__", "?")
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        native = not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    except ImportError:
        native = None
    has_bf16 = getattr(F, "has_avx512bf16", None)
    avx512_bf16 = bool(has_bf16()) if has_bf16 is not None else None
    try:
        ops = sys.modules.get("bitsandbytes.backends.cpu.ops") or importlib.import_module(
            "bitsandbytes.backends.cpu.ops")
    except ImportError:
        ops = None
    missing = object()
    kernel = getattr(ops, "gemm_4bit_forward_kernel", missing)
    if native is False:
        loaded, reason = False, "bitsandbytes' native CPU library did not load, so no CPU kernel was tried"
    elif kernel is missing and not avx512_bf16:
        loaded, reason = False, ("not tried: bitsandbytes loads it only on CPUs with AVX512-BF16, which this CPU "
                                 "lacks (its CPU 4-bit path is the native gemv/dequantize code)")
    elif kernel is missing:
        loaded, reason = False, f"bitsandbytes {version} does not use it"
    elif kernel is None:
        loaded, reason = False, _kernel_reason(version)
    else:
        loaded, reason = True, ""
    has_avx512 = getattr(ops, "_has_avx512", None)
    return {
        "version": version,
        "native_library": native,
        "avx512_bf16": avx512_bf16,  # bitsandbytes' own answer (has_avx512bf16)
        "linear4bit_eval_repack": avx512_bf16,  # Linear4bit.support_avx512bf16_for_cpu
        "int8_matmul": None if has_avx512 is None else ("torch._int_mm" if has_avx512 else "float32 matmul (default)"),
        "cpu_kernel": {"name": BNB_CPU_KERNEL, "loaded": loaded, "reason": reason},
    }


def cpu_dispatch() -> dict[str, Any]:
    """The CPU features torch and bitsandbytes dispatch on, and what bitsandbytes chose (for the fingerprint)."""
    try:
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
    except Exception as exc:  # noqa: BLE001
        capability = f"unknown ({type(exc).__name__}: {exc})"
    return {"flags": cpu_flags(), "torch_cpu_capability": capability, "bitsandbytes": bnb_cpu_backend()}


def describe(dispatch: dict[str, Any] | None = None) -> str:
    """One line naming the CPU features and bitsandbytes' CPU paths (``dispatch`` as ``cpu_dispatch()`` gives
    it, e.g. from a report's ``environment``; this machine's when None)."""
    d = cpu_dispatch() if dispatch is None else dispatch
    flags = d.get("flags")
    if flags is None:
        feats = "CPU flags unknown"
    else:
        yes = [f for f in CPU_FLAGS if flags.get(f)]
        no = [f for f in CPU_FLAGS if f in flags and not flags.get(f)]
        feats = "CPU " + (" ".join(yes) if yes else "none of the listed flags") + (f" (no {' '.join(no)})" if no
                                                                                   else "")
    line = f"{feats}; torch CPU capability {d.get('torch_cpu_capability')}"
    b = d.get("bitsandbytes") or {}
    if "error" in b:
        return f"{line}; {b['error']}"
    k = b.get("cpu_kernel") or {}
    line += (f"; bitsandbytes {b.get('version')}: AVX512-BF16 {'yes' if b.get('avx512_bf16') else 'no'} "
             f"(Linear4bit eval repack {'on' if b.get('linear4bit_eval_repack') else 'off'}), "
             f"int8 matmul {b.get('int8_matmul')}, CPU kernel gemm_4bit_forward "
             + ("loaded" if k.get("loaded") else f"not loaded ({k.get('reason')})"))
    return line
