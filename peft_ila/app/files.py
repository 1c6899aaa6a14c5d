"""Directories that appear whole or not at all, JSON output, and peak-memory readings."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..identification.distributed import rank
from ..tuner.atomic import written_atomically
from . import UsageError


def check_free(out: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to replace an existing output directory unless asked to."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite or choose another output path.")


@contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it replaces `out`, on any error it is removed,
    so `out` is never left half-written (Ctrl-C included)."""
    out = Path(out)
    check_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkdtemp makes the directory private and some writers (safetensors) their files: give the output the
        # permissions of a plain mkdir and open()
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def main_process_dir(out: Path, overwrite: bool = False) -> Iterator[Path | None]:
    """`staged_dir` on the main process (rank 0); None on the other ranks of a multi-process launch, which write
    nothing."""
    if rank() > 0:
        yield None
        return
    with staged_dir(out, overwrite) as tmp:
        yield tmp


def write_json(path: Path, data: object) -> None:
    """`data` as indented JSON in `path`, written whole or not at all."""
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist; pass a directory written by peft-ila.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); it is damaged, write it again.") from None


def status_mb(field: str) -> float | None:
    """A memory field of the process's Linux status, in MiB (`VmRSS`, `VmHWM`, `RssAnon`, ...); None elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    line = next((x for x in status.read_text().splitlines() if x.startswith(f"{field}:")), None)
    return int(line.split()[1]) / 1024 if line else None


def reset_peak_memory() -> float | None:
    """Start a new peak-memory window (the kernel's peak RSS on Linux, CUDA's peak allocation) after handing freed
    heap back to the system; returns the resident MiB at the start of the window."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # elsewhere (not Linux) the peak covers the whole process
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return status_mb("VmRSS")


def peak_memory_mb(start_mb: float | None = None) -> dict[str, float]:
    """Peak resident MiB since `reset_peak_memory` (and its rise over `start_mb`), and the CUDA peak on a GPU."""
    rss = status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"peak_rss_mb": round(rss, 1)}
    if start_mb is not None:
        out["rss_rise_mb"] = round(rss - start_mb, 1)
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
