"""Whose fault an exception from a stage is (farm/lifecycle.py routes each kind).

    infra   the broker, the store, the network: RetryableError (BrokerUnavailable,
            StoreUnavailable), OS and connection errors
    oom     out of memory: torch's OutOfMemoryError, MemoryError, "out of memory"
    worker  the device or the process: CUDA/cuDNN/cuBLAS errors, an illegal memory access, a
            device-side assert; and anything not known to be the job's (retried elsewhere, up
            to FARM_MAX_ATTEMPTS, so a broken GPU never fails a job alone)
    job     the input cannot be rendered: a ValidationError, ValueError, TypeError, IndexError,
            KeyError, NotImplementedError, or the stage's own verdict (StageFailed, e.g.
            corrupt latents)
"""

from __future__ import annotations

from farm.errors import RetryableError, ValidationError
from farm.lifecycle import Fault
from farm.worker.context import StageFailed

_DEVICE_WORDS = ("cuda", "cudnn", "cublas", "nccl", "illegal memory access", "device-side assert",
                 "hip error", "xpu error", "accelerator")
# deterministic for the input: another worker would fail the same way (NotImplementedError: a
# stage this backend cannot run, e.g. the load-test stand-in's split stages)
_JOB_ERRORS = (ValidationError, ValueError, TypeError, IndexError, KeyError, ZeroDivisionError,
               NotImplementedError)


def classify(exc: BaseException) -> Fault:
    if isinstance(exc, StageFailed):
        return exc.fault
    if _is_infra(exc):
        return Fault.INFRA
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" \
            or "out of memory" in text:
        return Fault.OOM
    if isinstance(exc, RuntimeError) and any(word in text for word in _DEVICE_WORDS):
        return Fault.WORKER
    if isinstance(exc, _JOB_ERRORS):
        return Fault.JOB
    return Fault.WORKER


def _is_infra(exc: BaseException) -> bool:
    if isinstance(exc, (RetryableError, OSError, ConnectionError, TimeoutError)):
        return True
    try:
        import redis
    except ImportError:  # pragma: no cover - redis is a dependency
        return False
    return isinstance(exc, redis.RedisError)


def describe(exc: BaseException) -> str:
    """One line: the exception's type and message."""
    if isinstance(exc, StageFailed):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
