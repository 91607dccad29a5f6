"""Telling a broken device from a batch that ran out of memory and from a bad item.

The messages are CUDA's (through torch or vLLM); an error that matches none of them is an
item's or a batch's, never the device's.
"""

from __future__ import annotations

# Messages of errors that mean the GPU (not the item) is broken: no item is to blame.
FATAL_MARKERS = (
    "CUDA error",
    "device-side assert",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "illegal memory access",
)
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_oom(error: BaseException) -> bool:
    """Out of GPU memory (a smaller batch may fit)."""
    if _is_torch_oom(error):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in OOM_MARKERS)


def is_fatal(error: BaseException) -> bool:
    """The device is broken: the worker must stop and start afresh."""
    return (
        isinstance(error, RuntimeError) and not is_oom(error) and any(m in str(error) for m in FATAL_MARKERS)
    )


def _is_torch_oom(error: BaseException) -> bool:
    import torch  # here, not at the top: naming the engine package stays free of torch

    return isinstance(error, torch.cuda.OutOfMemoryError)
