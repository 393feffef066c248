"""Checkpoints: one file per step, written by rank 0 atomically, loaded safely.

Layout inside a run directory:

    checkpoints/step_00001234.pt   one file per checkpoint; names sort by step
    checkpoints/latest             the file name of the newest complete checkpoint (a pointer, replaced atomically)

A checkpoint is a dict of tensors and plain Python values only (see `FORMAT`), so it loads with
`torch.load(weights_only=True)`: a file crafted to run code when unpickled is refused, not executed.
Writing goes to a temporary name in the same directory, is flushed and fsynced, then renamed; the
`latest` pointer is replaced the same way afterwards. A crash at any moment leaves either the old
state or the new one, never a half file under a real name. Retention deletes only older
`step_*.pt` files, and only after the new one is safely in place.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .errors import UserError

FORMAT = 1  # bump when the layout of the dict changes incompatibly
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the cause."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def file_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def save(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write `payload` as the checkpoint of `step`, point `latest` at it, keep the newest `keep`."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "step": step, **payload}
    path = d / file_name(step)
    atomic_write(path, lambda fh: torch.save(payload, fh))
    atomic_write(d / LATEST, lambda fh: fh.write(path.name.encode() + b"\n"))
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint files of a run directory, oldest first (temporary files are ignored)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoints to try when resuming, best first: the one `latest` names, then the rest newest first."""
    files = list_checkpoints(run_dir)[::-1]
    pointer = checkpoint_dir(run_dir) / LATEST
    if pointer.is_file():
        named = checkpoint_dir(run_dir) / pointer.read_text().strip()
        if named in files:
            files.remove(named)
            files.insert(0, named)
    return files


def resolve(path: str | Path) -> Path:
    """A checkpoint file as given, or the latest checkpoint of a run directory."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        found = candidates(p) or (candidates(p.parent) if p.name == "checkpoints" else [])
        if not found:
            raise CheckpointError(f"{p} holds no checkpoints (no checkpoints/step_*.pt); pass a run directory "
                                  "that has trained, or a checkpoint file")
        return found[0]
    raise CheckpointError(f"checkpoint {p} does not exist; pass a checkpoint file or a run directory")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain values only), or raise a one-line CheckpointError."""
    p = Path(path)
    try:
        data = torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {p} does not exist; pass a checkpoint file or a run directory") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {p} is not readable (permission denied); fix its permissions") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
        text = str(exc).strip().splitlines()
        reason = text[0] if text else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "UnpicklingError" in type(exc).__name__:
            cause = "it holds objects other than tensors and plain values and was refused (it could run code when loaded)"
        else:
            cause = f"it is truncated or not a checkpoint ({reason[:160]})"
        raise CheckpointError(f"checkpoint {p} cannot be loaded: {cause}; use another checkpoint") from None
    if not isinstance(data, dict) or "format" not in data or "model" not in data:
        raise CheckpointError(f"checkpoint {p} is not an lstm_dist checkpoint (no format/model entries)")
    if data["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {p} has format {data['format']}, this version reads format {FORMAT}; "
                              "use the lstm_dist version that wrote it")
    return data
