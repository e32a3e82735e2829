"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from search_fixtures import write_corpus, write_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: on a shared 2-core machine one thread is ~10x faster than contending for two.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory) -> Callable[..., tuple[Path, Path]]:
    """What a module's tests search on: `tiny_files(name, window=32, corpus=write_corpus, **options)` writes a tiny
    model with that window and a corpus (`corpus(root, **options)`) into a fresh folder named after `name`, and
    returns (model dir, corpus dir); the folder (`model.parent`) is the module's to add runs and configs to."""
    def make(name: str, window: int = 32, corpus: Callable[..., Path] = write_corpus, **options) -> tuple[Path, Path]:
        root = tmp_path_factory.mktemp(name)
        return write_model(root, window=window), corpus(root, **options)
    return make
