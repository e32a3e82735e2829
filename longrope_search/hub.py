"""The Hugging Face Hub as export uses it: a model snapshot downloaded to a local folder, and an export uploaded.

huggingface_hub comes with transformers; it is imported inside the calls, so tests can replace `HfApi` and
`snapshot_download` (no network).
"""

from __future__ import annotations

from pathlib import Path

from longrope_search.errors import ExportError, first_line

# What export needs of a model repository: config, tokenizer and generation files, and transformers' weights
# (safetensors, or .bin when a repository has nothing else); other frameworks' checkpoints are not downloaded.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.py", "LICENSE*"]


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """A local folder with the hub model `repo_id` (huggingface_hub's cache; a finished download is reused)."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types (HTTP, auth, not found, offline)
        raise ExportError(
            f"cannot download model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
            + f" from the Hugging Face Hub ({first_line(exc)}); check the id and your access (huggingface-cli login "
            "or HF_TOKEN for gated models), or pass --model with a local folder."
        ) from exc


def push_folder(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export to the hub model repository `repo_id` (created when missing); the repository's URL."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload a LongRoPE export (longrope export --push-to-hub)",
                          ignore_patterns=[".*"])
    except Exception as exc:  # noqa: BLE001 - HTTP, auth, and validation errors of huggingface_hub
        raise ExportError(
            f"cannot upload {folder} to the hub repository {repo_id!r} ({first_line(exc)}); log in with "
            f"huggingface-cli login (or set HF_TOKEN) with write access, then push again: longrope export RUN "
            f"--out {folder} --force --push-to-hub {repo_id} (RUN: the run you exported)."
        ) from exc
    return f"https://huggingface.co/{repo_id}"
