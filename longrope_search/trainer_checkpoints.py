"""The fine-tune's checkpoints folder (DIR/checkpoints): which checkpoint a resume continues from, and deleting only
what the Trainer wrote there (the folder may be a link to a scratch disk that holds other things too).
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

from longrope_search.errors import CheckpointError
from longrope_search.progress import SILENT, Reporter
from longrope_search.rundir import CHECKPOINTS_DIR

CHECKPOINTS_KEPT = 2  # the newest checkpoint and the one before it (a kill inside a save leaves the older one)
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: a checkpoint with it is complete


def _step(path: Path) -> int | None:
    """N of a folder named checkpoint-N, else None."""
    tail = path.name.split("-")[-1]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def trainer_file(name: str) -> bool:
    """A file the Trainer writes into a checkpoint (weights, optimizer, scheduler, RNG, state; LoRA's adapters;
    under FSDP its sharded states), or a temporary of one."""
    stem = name.split(".")[0]
    return (name in ("config.json", "generation_config.json", TRAINER_STATE, "training_args.bin", "scheduler.pt",
                     "optimizer.pt", "model.safetensors.index.json", "adapter_config.json", "README.md")
            or stem.startswith(("model", "adapter_model", "rng_state", "pytorch_model", "optimizer", "__", "pytorch_")))


def check_checkpoints(folder: Path) -> None:
    """Every checkpoint-N folder in DIR/checkpoints (which the trainer rotates and a resume cleans, through a link
    too) is one the fine-tune wrote; anything else there is refused before it could be deleted."""
    root = folder / CHECKPOINTS_DIR
    for path in sorted(root.glob("checkpoint-*")) if root.is_dir() else []:
        foreign = [p.name for p in path.iterdir() if not trainer_file(p.name)] if path.is_dir() else [path.name]
        if path.is_symlink() or _step(path) is None or foreign:
            raise CheckpointError(f"{path} was not written by `longrope finetune` (it holds {', '.join(foreign[:3]) or 'a link'}"
                                  f"); move it out of {root}, which the fine-tune rotates and cleans.")


def _safetensors_whole(path: Path) -> bool:
    """The file holds every byte its header promises (a kill or a full disk truncates it)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > path.stat().st_size - 8:  # a garbage length: never allocate it
            return False
        header = json.loads(f.read(size))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return path.stat().st_size >= 8 + size + max(ends, default=0)


def damaged_file(checkpoint: Path) -> Path | None:
    """The first file of `checkpoint` that cannot be whole: a torch.save archive (optimizer, scheduler, RNG, training
    arguments) whose zip directory is unreadable, or weights shorter than their header says. Reads the ends of the
    files only, never the tensors."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
                return path
            if path.suffix == ".safetensors" and not _safetensors_whole(path):
                return path
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
            return path
    return None


def latest_checkpoint(folder: Path, clean: bool = True, reporter: Reporter = SILENT) -> Path | None:
    """The newest complete checkpoint (its trainer state, written last, readable); with `clean`, the incomplete ones
    a kill left behind are removed (check_checkpoints made sure they are ours), so the trainer never resumes from or
    rotates onto them; one whose trainer state is there but unreadable is warned about."""
    root = folder / CHECKPOINTS_DIR
    found = sorted((p for p in root.glob("checkpoint-*") if _step(p) is not None), key=_step) if root.is_dir() else []
    while found:
        newest = found.pop()
        try:
            json.loads((newest / TRAINER_STATE).read_text())
            damaged = damaged_file(newest)
        except (OSError, ValueError):
            damaged = (newest / TRAINER_STATE) if (newest / TRAINER_STATE).is_file() else None
        else:
            if damaged is None:
                return newest
        if damaged is not None:
            reporter.warn(f"{damaged} is damaged (cut short by a kill or a full disk?); "
                          + ("removing that checkpoint and resuming from the one before it" if clean else "skipped"))
        if clean:
            shutil.rmtree(newest, ignore_errors=True)  # our own half-written or damaged checkpoint
    return None


def remove_from(folder: Path, step: int) -> None:
    """The checkpoints of `step` and later (written after a fine-tune diverged), never through a link."""
    for path in (folder / CHECKPOINTS_DIR).glob("checkpoint-*"):
        if (_step(path) or 0) >= step and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
