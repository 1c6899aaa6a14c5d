"""Directories that appear whole or not at all, JSON output, and peak-memory readings."""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import gc
import itertools
import json
import os
import resource
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..identification.distributed import rank
from ..tuner.atomic import written_atomically
from . import UsageError

MANIFEST = ".peft-ila.json"  # in every output directory: what peft-ila wrote there, so --overwrite replaces only that
# Outputs written before the manifest, recognised by the file each kind always has and the names it may hold
LEGACY = {
    "importance.json": ("an identify run", ("importance.json", "mask.safetensors", "heatmap.png", "report.md")),
    "compare.json": ("a compare directory", ("compare.json", "compare.png")),
    "demo.json": ("a demo directory", ("demo.json", "reload.json", "identify", "adapter")),
    "training.json": (
        "an adapter or model written by train",
        (
            "training.json",
            "adapter_config.json",
            "adapter_model.safetensors",
            "README.md",
            "ila_*.safetensors",
            "config.json",
            "generation_config.json",
            "model*.safetensors",
            "model.safetensors.index.json",
            "tokenizer*",
            "special_tokens_map.json",
            "chat_template.jinja",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
        ),
    ),
}


def check_free(out: Path, overwrite: bool) -> None:
    """Refuse early (before any work) an output path that exists, unless `overwrite` and it is an output peft-ila
    wrote (or an empty directory): a file, a folder with anything peft-ila did not write there, and the working
    directory are never replaced."""
    out = Path(out)
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise UsageError(f"--out {out} is the working directory or holds it; choose a new directory to write.")
    if not (out.exists() or out.is_symlink()):
        return
    kind = written_by_peft_ila(out)
    if not overwrite:
        raise UsageError(
            f"{out} already exists ({kind}); pass --overwrite to replace it, or choose another output path."
        )


def written_by_peft_ila(out: Path) -> str:
    """What `out` is (e.g. "an identify run"), if peft-ila wrote all of it; else a `UsageError` saying why it may not
    be replaced (a file, a link, a folder holding what peft-ila did not write, named). Stops reading a large folder at
    its first few foreign entries."""
    if out.is_symlink() or not out.is_dir():
        what = "a symbolic link" if out.is_symlink() else "a file"
        raise UsageError(f"{out} is {what}, not an output of peft-ila; choose another output path (it is left alone).")
    if next(out.iterdir(), None) is None:
        return "an empty directory"
    entries = (p.relative_to(out).as_posix() for p in out.rglob("*"))
    try:
        written = json.loads((out / MANIFEST).read_text())
        kind, known = written["kind"], set(written["entries"]) | {MANIFEST}
        foreign = (name for name in entries if name not in known)
    except (OSError, ValueError, KeyError, TypeError):  # no manifest (an older output), or a damaged one
        kind, foreign = _legacy_kind(out, entries)
    shown = sorted(itertools.islice(foreign, 4))
    if kind is None or shown:
        listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "") if shown else "no peft-ila output"
        raise UsageError(
            f"{out} exists and holds what peft-ila did not write there ({listed}); it replaces only its own outputs: "
            "choose another output path (the folder is left alone)."
        )
    return kind


def _legacy_kind(out: Path, entries: Iterable[str]) -> tuple[str | None, Iterator[str]]:
    """(kind, the entries that do not belong to it) of an output written before the manifest, recognised by
    `LEGACY`; (None, entries) when it is none of them."""
    signature = next((name for name in LEGACY if (out / name).is_file()), None)
    if signature is None:
        return None, iter(entries)
    kind, names = LEGACY[signature]
    nested = {"identify": "importance.json", "adapter": "training.json"}  # a demo directory's two outputs

    def belongs(entry: str) -> bool:
        top, _, rest = entry.partition("/")
        if not any(fnmatch.fnmatch(top, pattern) for pattern in names):
            return False
        if not rest:
            return True
        inner = LEGACY[nested[top]][1] if top in nested else ()
        return "/" not in rest and any(fnmatch.fnmatch(rest, pattern) for pattern in inner)

    return kind, (entry for entry in entries if not belongs(entry))


@contextmanager
def staged_dir(out: Path, overwrite: bool = False, kind: str = "an output of peft-ila") -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it replaces `out`, on any error it is removed,
    so `out` is never left half-written (Ctrl-C included). Its `MANIFEST` records `kind` and what was written, so
    that a later --overwrite may replace it; an existing `out` is checked again (`check_free`) before it goes."""
    out = Path(out)
    check_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        entries = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*"))
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "peft-ila", "kind": kind, "entries": entries}) + "\n")
        # mkdtemp makes the directory private and some writers (safetensors) their files: give the output the
        # permissions of a plain mkdir and open()
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        try:
            check_free(out, overwrite)  # the folder may have changed while the job ran
        except UsageError as exc:  # the result is kept, not lost
            kept = out.with_name(f"{out.name}.new-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(tmp, kept)
            raise UsageError(f"{exc} The result is in {kept}.") from None
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
def main_process_dir(out: Path, overwrite: bool = False, kind: str = "an output of peft-ila") -> Iterator[Path | None]:
    """`staged_dir` on the main process (rank 0); None on the other ranks of a multi-process launch, which write
    nothing."""
    if rank() > 0:
        yield None
        return
    with staged_dir(out, overwrite, kind) as tmp:
        yield tmp


def write_json(path: Path, data: object) -> None:
    """`data` as indented JSON in `path`, written whole or not at all."""
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def output_kind(directory: Path) -> str | None:
    """What peft-ila output `directory` is ("an identify run", ...), by its manifest or, for an older output, the file
    its kind always has; None if it is none."""
    try:
        return json.loads((Path(directory) / MANIFEST).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return next((kind for name, (kind, _) in LEGACY.items() if (Path(directory) / name).is_file()), None)


def read_json(path: Path, wanted: str = "a directory written by peft-ila") -> dict:
    """The JSON file `path` of an output directory; a missing one is a usage error saying what its directory is and
    what was `wanted` there instead (e.g. "a run directory of `peft-ila identify`")."""
    path = Path(path)
    if not path.is_file():
        kind = output_kind(path.parent) if path.parent.is_dir() else None
        found = f"{path.parent} is {kind}, not {wanted}" if kind else f"pass {wanted}"
        raise UsageError(f"{path} does not exist: {found}.")
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
