"""Results JSON with provenance, written atomically so a crash never leaves half a file."""

import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .paths import REPO_ROOT

log = logging.getLogger(__name__)

TRACKED_PACKAGES = ("torch", "numpy", "tokenizers", "transformers", "papermill", "matplotlib", "seaborn")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX file systems, so readers see either the old file or the
    new one. An unwritable folder raises OSError naming the folder.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot write to {path.parent} ({exc.strerror}); choose a writable output folder"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would.
        os.chmod(tmp_name, 0o666 & ~_current_umask())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def replace_between_markers(path: Path, start_mark: str, end_mark: str, block: str) -> None:
    """Replace the text between two marker lines of a file, atomically, keeping the markers."""
    text = path.read_text(encoding="utf-8")
    if start_mark not in text or end_mark not in text:
        raise ValueError(f"{path} lacks the markers {start_mark} and {end_mark}; add them where the table goes")
    head, rest = text.split(start_mark, 1)
    _, tail = rest.split(end_mark, 1)
    atomic_write_bytes(path, f"{head}{start_mark}\n{block}{end_mark}{tail}".encode("utf-8"))


def _jsonable(value: Any) -> Any:
    """Convert tensors, paths and non-finite floats into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or Infinity; keep them readable
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Serialise `payload` (sorted keys, 2-space indent) and write it atomically."""
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def git_commit() -> dict:
    """Return the repository's HEAD commit and whether tracked files outside results/ differ from it."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    # results/ is excluded because a running `make reproduce` rewrites its tracked files itself.
    status = run("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_description(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {"device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def provenance(parameters: dict, seed: int, device: torch.device | str) -> dict:
    """Collect what a reader needs to rerun a result: commit, parameters, versions, device, seed."""
    return {
        "git": git_commit(),
        "parameters": parameters,
        "seed": seed,
        "versions": package_versions(),
        "device": device_description(device),
    }


class ResultsRecorder:
    """Collect one notebook's measured values and write them with provenance.

    Timestamps and wall time live under the separate key "timing", so two runs with the same
    seed produce identical "values" and "provenance" (except the git state) and can be compared.
    """

    def __init__(self, path: str | os.PathLike, parameters: dict, seed: int, device: torch.device | str):
        self.path = Path(path)
        self.values: dict[str, Any] = {}
        self.checks: dict[str, Any] = {}
        self.verdicts: list[dict] = []
        self.timings: dict[str, Any] = {}
        self._provenance = provenance(parameters, seed, device)
        self._started = _dt.datetime.now(_dt.timezone.utc)

    def record(self, **values: Any) -> None:
        self.values.update(values)

    def record_timing(self, **seconds: Any) -> None:
        """Store wall times (in seconds) under "timing", apart from the values that reruns reproduce."""
        reserved = {"started_utc", "finished_utc", "wall_time_s"} & seconds.keys()
        if reserved:
            raise ValueError(f"timing keys {sorted(reserved)} are written by the recorder itself; pick other names")
        self.timings.update(seconds)

    def add_verdict(self, claim: str, paper_value: str, our_value: str, verdict: str, profile: str) -> dict:
        allowed = ("reproduced", "partial", "not reproduced")
        if verdict not in allowed:
            raise ValueError(f"verdict {verdict!r} must be one of {allowed}")
        row = {"claim": claim, "paper": paper_value, "ours": our_value, "verdict": verdict, "profile": profile}
        self.verdicts.append(row)
        return row

    def write(self) -> Path:
        finished = _dt.datetime.now(_dt.timezone.utc)
        payload = {
            "values": self.values,
            "checks": self.checks,
            "verdicts": self.verdicts,
            "provenance": self._provenance,
            "timing": {
                "started_utc": self._started.isoformat(timespec="seconds"),
                "finished_utc": finished.isoformat(timespec="seconds"),
                "wall_time_s": round((finished - self._started).total_seconds(), 2),
                **self.timings,
            },
        }
        write_json(self.path, payload)
        log.info("results written path=%s values=%d", self.path, len(self.values))
        return self.path
