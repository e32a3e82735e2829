"""Typed exceptions for user mistakes. The CLI turns each into one line on stderr and exit code 2.

The message of every error names the problem and the fix; no traceback is shown for these.
"""

from pathlib import Path


class LongRopeError(Exception):
    """Base class: a mistake the user can fix (bad input, missing file, ...)."""


class ConfigError(LongRopeError):
    """The YAML config or a command-line override is invalid."""


class ModelError(LongRopeError):
    """The model cannot be loaded, or has no RoPE we can rescale."""


class DataError(LongRopeError):
    """The corpus cannot be read, or has too few long documents."""


class CheckpointError(LongRopeError):
    """A run directory or checkpoint is missing, corrupt, or belongs to another search."""


class ExportError(LongRopeError):
    """Factors cannot be exported, or the exported model does not reproduce them."""


class GeometryError(ModelError):
    """A factors file does not belong to the model: another rotary dimension or rope_theta."""


class SearchError(LongRopeError):
    """The search space is impossible, or exhausted before the search could continue."""


class DependencyError(LongRopeError):
    """An optional package a command needs is not installed (matplotlib for plot, accelerate for a device map)."""


class StorageError(LongRopeError):
    """A file cannot be written or a folder created: disk full, no permission, a file where a folder should be."""


def first_line(exc: BaseException) -> str:
    """The first line of a library exception's message, quoted inside our one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def install_hint(extra: str) -> str:
    """The command that installs an optional part from where this copy was installed: a checkout (an editable
    install, pyproject.toml beside the package) gets `pip install -e "ROOT[extra]"`, an installed wheel
    `pip install "longrope[extra]"`; quoted, so zsh does not read the brackets as a glob."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return f'pip install -e "{root}[{extra}]"'
    return f'pip install "longrope[{extra}]"'
