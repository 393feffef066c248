"""Checkpoints: one file per step, written by rank 0 atomically, loaded safely.

Layout inside a run directory:

    checkpoints/step_00001234.pt   one file per checkpoint; names sort by step
    checkpoints/latest             the file name of the newest complete checkpoint (a pointer, replaced atomically)

A training checkpoint (format 1) is a dict: `format`, `step`, `config`, `vocab`, then the state of
the objects that own it, each through its `state_dict()` (`Pieces`; which objects, under which keys,
is written where the trainer builds them: `training.loop.checkpoint_pieces`). `save_training` writes
it; `choose_resume` then `restore` put it back. It holds tensors and plain Python values only, so it
loads with `torch.load(weights_only=True)`: a file crafted to run code when unpickled is refused, not
executed. Writing goes to a temporary name in the same directory, is flushed and fsynced, then renamed; the
`latest` pointer is replaced the same way afterwards. A crash at any moment leaves either the old
state or the new one, never a half file under a real name. Retention deletes only older
`step_*.pt` files, and only after the new one is safely in place.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import torch

from lstm_dist.common import faults
from lstm_dist.common.atomic import atomic_write
from lstm_dist.data.corpus import Vocab
from lstm_dist.common.distributed import DistEnv, on_every_rank, broadcast_object, gather_objects
from lstm_dist.common.errors import EveryRankError, UserError, first_line
from lstm_dist.data.streams import Restore
from lstm_dist.training.batching import batch_layout

FORMAT = 1  # bump when the layout of the dict changes incompatibly
_NAME = re.compile(r"^step_(\d{8,})\.pt$")
LATEST = "latest"


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names the file and the cause."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def file_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _tensor_bytes(obj: Any) -> int:
    """The bytes of all tensors in a nested payload: within a few per cent of its file's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write `payload` as the checkpoint of `step`, point `latest` at it, keep the newest `keep`.

    A full disk (or quota) ends in a CheckpointError that names the directory, the bytes needed and
    free, and the checkpoint still in place; the temporary file is removed, nothing else is touched."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "step": step, **payload}
    path = d / file_name(step)
    need = _tensor_bytes(payload)
    try:
        if shutil.disk_usage(d).free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        atomic_write(path, lambda fh: torch.save(payload, fh),
                     before_rename=lambda: faults.at("checkpoint-before-rename", step))
        faults.at("checkpoint-before-latest", step)
        atomic_write(d / LATEST, lambda fh: fh.write(path.name.encode() + b"\n"))
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        if getattr(exc, "errno", None) not in (errno.ENOSPC, errno.EDQUOT) and "No space left" not in str(exc):
            raise
        kept = candidates(run_dir)
        last = f"the last checkpoint, {kept[0].name}, is intact" if kept else "no checkpoint was written before"
        raise CheckpointError(f"cannot write checkpoint {path.name} in {d}: no space left on device (it needs about "
                              f"{need:,} bytes, {shutil.disk_usage(d).free:,} are free); {last}; free space there or "
                              "move run.dir to a larger disk, then run the same command to resume") from None
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
        run_dir = p.parent if p.name == "checkpoints" and not checkpoint_dir(p).is_dir() else p
        pointer = checkpoint_dir(run_dir) / LATEST
        if pointer.is_file():  # a pointer naming a missing file: the newest checkpoint is gone, do not guess another
            named = checkpoint_dir(run_dir) / pointer.read_text().strip()
            if not named.is_file():
                raise CheckpointError(f"{pointer} names {named.name}, which does not exist; pass one of the checkpoint "
                                      f"files in {checkpoint_dir(run_dir)} instead, or fix {pointer}")
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
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            data = torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {p} does not exist; pass a checkpoint file or a run directory") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {p} is not readable (permission denied); fix its permissions") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
        # torch.save writes a zip archive; anything else was cut short or overwritten. Inside an
        # archive, the weights-only unpickler names the global it refused to call.
        if not zipfile.is_zipfile(p):
            cause = "it is truncated or not a checkpoint (not the zip archive torch.save writes)"
        elif "unsupported global" in str(exc).lower():
            cause = "it holds objects other than tensors and plain values and was refused (it could run code when loaded)"
        else:
            cause = f"it is truncated or not a checkpoint ({first_line(exc, 160)})"
        raise CheckpointError(f"checkpoint {p} cannot be loaded: {cause}; use another checkpoint") from None
    if not isinstance(data, dict) or "format" not in data or "model" not in data:
        raise CheckpointError(f"checkpoint {p} is not an lstm_dist checkpoint (no format/model entries)")
    if data["format"] != FORMAT:
        raise CheckpointError(f"checkpoint {p} has format {data['format']}, this version reads format {FORMAT}; "
                              "use the lstm_dist version that wrote it")
    return data


def check_compatible(saved: dict[str, Any], cfg: Any, vocab: Vocab, path: Path, *, subject: str = "",
                     has: str = "this run has", model_fix: str = "or start a new run.name",
                     vocab_fix: str = "use the corpus it was trained on or start a new run.name") -> None:
    """A checkpoint must be of the same model on the same vocabulary; say which setting differs. `subject`
    (default `checkpoint PATH`), `has` and the two fixes word the one-line CheckpointError for the caller."""
    subject = subject or f"checkpoint {path}"
    saved_model = saved["config"]["model"]
    for key in ("embedding", "hidden", "layers"):
        if saved_model[key] != getattr(cfg.model, key):
            raise CheckpointError(
                f"{subject} is of another model (model.{key}={saved_model[key]}, {has} "
                f"{getattr(cfg.model, key)}); set model.{key}={saved_model[key]} {model_fix}")
    if saved["vocab"] != vocab.to_dict():
        raise CheckpointError(f"{subject} was trained on another vocabulary than the corpus at {cfg.data.path}; {vocab_fix}")


def init_weights(cfg: Any, vocab: Vocab) -> tuple[Path, int, dict[str, torch.Tensor]]:
    """`checkpoint.init_from`'s (file, step, model weights), for a run that starts from them: raises a
    one-line CheckpointError where it cannot be read or is of another model or vocabulary."""
    path = resolve(cfg.checkpoint.init_from)
    saved = load(path)
    check_compatible(saved, cfg, vocab, path, subject=f"checkpoint.init_from={cfg.checkpoint.init_from}: {path}",
                     has="this config has", model_fix="to start from it",
                     vocab_fix="prepare the new text with that checkpoint's vocabulary, or start from scratch")
    return path, int(saved["step"]), saved["model"]


def find_resume(cfg: Any, vocab: Vocab, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from per `checkpoint.resume` (rank 0 decides; every rank then loads it)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        return None
    if mode != "auto":
        path = resolve(mode)
        saved = load(path)
        check_compatible(saved, cfg, vocab, path)
        return path, saved
    for path in candidates(cfg.run_dir):
        try:
            saved = load(path)
        except CheckpointError as exc:
            say(f"warning: {exc}; falling back to the previous checkpoint")
            continue
        # Another model or vocabulary is a mistake in this config, not a damaged file: the older
        # checkpoints of the run are of the same model, and starting fresh would write over the run.
        check_compatible(saved, cfg, vocab, path)
        return path, saved
    return None


SET_ASIDE = ".diverged"  # suffix of a checkpoint set aside by `set_aside_from`: no longer a step_*.pt


def set_aside_from(run_dir: str | Path, step: int) -> tuple[Path | None, list[Path]]:
    """Set aside every checkpoint of `step` or later (renamed `step_N.pt.diverged`: kept for a look,
    never resumed from) and point `latest` at the newest one before it, or remove `latest` where
    none is left. Returns (that newest remaining checkpoint or None, the files set aside as renamed).

    Used when a run stops on failed steps: the checkpoint written just before the first failed step
    holds the weights that failed, so only an older one is known to be healthy."""
    d = checkpoint_dir(run_dir)
    moved = []
    for path in list_checkpoints(run_dir):
        if int(_NAME.match(path.name).group(1)) >= step:
            target = path.with_name(path.name + SET_ASIDE)
            os.replace(path, target)
            moved.append(target)
    kept = list_checkpoints(run_dir)
    if kept:
        atomic_write(d / LATEST, lambda fh: fh.write(kept[-1].name.encode() + b"\n"))
    else:
        (d / LATEST).unlink(missing_ok=True)
    return (kept[-1] if kept else None), moved


class Stateful(Protocol):
    """A piece of checkpoint state: its state as tensors and plain values, and the way back."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Pieces(NamedTuple):
    """What a training checkpoint holds besides its format, step, config and vocabulary, by key in
    the file, in the file's order (the trainer builds it: `training.loop.checkpoint_pieces`)."""

    shared: dict[str, Stateful]  # top-level entries: the same on every rank, rank 0's written
    per_rank: dict[str, Stateful]  # ranks[r][key]: every rank's own, gathered to rank 0; must hold "stream"


class Chosen(NamedTuple):
    """The checkpoint a run resumes from: its path, and the contents rank 0 read to choose it (None elsewhere)."""

    path: Path
    saved: dict[str, Any] | None


class Resumed(NamedTuple):
    """Where a run picked up: its step, and whether it continues exactly or on re-cut streams."""

    path: Path
    step: int
    exact: bool  # same processes × streams × bptt and split: every per-rank piece restored, not only the stream
    resliced: bool  # the same global streams on another number of processes: states re-sliced, generators not
    written_by: str  # the layout that wrote it, "2 processes × 4 streams × bptt 16" (streams: each rank's share)
    config: dict[str, Any]  # the config of the run that wrote it (Config.to_dict())
    world: int  # how many processes wrote it
    streams: int  # the global batch it was written with: streams over all its ranks


def choose_resume(cfg: Any, env: DistEnv, vocab: Vocab, say: Callable[[str], None]) -> Chosen | None:
    """Collective: rank 0 picks the checkpoint to resume from per `checkpoint.resume` (`find_resume`)
    and every rank learns its path; None when there is none. Choosing reads and writes nothing else,
    so a run refused for its checkpoint (a CheckpointError on every rank) leaves its run directory as
    it was: claim the run directory after this, before `restore` has any rank read the file."""
    found = on_every_rank(lambda: find_resume(cfg, vocab, say) if env.is_main else None)
    name = broadcast_object(str(found[0]) if found else None)
    return None if name is None else Chosen(Path(name), found[1] if found else None)


def restore(chosen: Chosen, cfg: Any, env: DistEnv, pieces: Pieces) -> Resumed:
    """Load the chosen checkpoint into `pieces`. Collective; raises CheckpointError on every rank when
    the file cannot be read or does not fit.

    Every shared piece gets its entry (None for a key the file lacks: written before that piece
    existed; the piece decides what that means). Per rank, the `stream` piece decides: this rank's own
    entry when the file was written by as many processes with the same streams per rank and bptt, else
    rank 0's (the cursor is the same on every rank). When the stream continues exactly (`Restore.EXACT`:
    the same global streams) on as many processes, the other per-rank pieces get their own entries too
    (`Resumed.exact`). On another number of processes (`Resumed.resliced`), a per-rank piece with a
    `load_resliced(entries, rank, world)` method gets every old rank's entry to take this rank's share
    from (the hidden states: `state._StatePiece`); the others are left as they are (the caller seeds
    new generators). Otherwise (a re-cut) they are all left as they are: zero states, new generators."""
    saved = on_every_rank(lambda: chosen.saved if chosen.saved is not None else load(chosen.path))

    def load_shared() -> None:
        try:
            for key, piece in pieces.shared.items():
                piece.load_state_dict(saved.get(key))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {chosen.path} does not fit this model: {first_line(exc)}; "
                                  "use the config it was written with") from None

    on_every_rank(load_shared)
    ranks = saved["ranks"]
    old = ranks[0]["stream"]
    same_processes = (len(ranks) == env.world and old["batch"] == batch_layout(cfg.train, env.world).per_rank
                      and old["bptt"] == cfg.train.bptt)
    mine = ranks[env.rank] if same_processes else ranks[0]
    # The stream re-cuts by itself when the split changed length, even with the same processes.
    same_streams = pieces.per_rank["stream"].load_state_dict(mine["stream"]) is Restore.EXACT
    exact, resliced = same_streams and same_processes, same_streams and not same_processes
    for key, piece in pieces.per_rank.items():
        if key == "stream":
            continue
        if exact:
            piece.load_state_dict(mine.get(key))
        elif resliced and hasattr(piece, "load_resliced"):
            piece.load_resliced([r.get(key) for r in ranks], env.rank, env.world)
    return Resumed(chosen.path, int(saved["step"]), exact, resliced,
                   f"{len(ranks)} processes × {old['batch']} streams × bptt {old['bptt']}", saved["config"], len(ranks),
                   len(ranks) * int(old["batch"]))


def save_training(cfg: Any, env: DistEnv, vocab: Vocab, step: int, pieces: Pieces) -> Path | None:
    """Collective: gather every rank's per-rank pieces; rank 0 writes the checkpoint of `step` (and
    returns its path; None elsewhere): format, step, config, vocab, the shared pieces, then `ranks`.
    A CheckpointError (a full disk) is raised on every rank, as an EveryRankError; all ranks leave together."""
    ranks = gather_objects({key: piece.state_dict() for key, piece in pieces.per_rank.items()})
    path, error = None, None
    if env.is_main:
        try:
            path = save(cfg.run_dir, step, {
                "config": cfg.to_dict(),
                "vocab": vocab.to_dict(),
                **{key: piece.state_dict() for key, piece in pieces.shared.items()},
                "ranks": ranks,
            }, keep=cfg.checkpoint.keep)
        except CheckpointError as exc:
            error = str(exc)
    error = broadcast_object(error)  # also the point where all ranks leave together
    if error is not None:
        raise EveryRankError(error)  # no rank trains on without the checkpoints it would need
    return path
