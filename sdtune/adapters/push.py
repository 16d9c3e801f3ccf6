"""Upload a run folder (adapter, model card, config) to the Hugging Face Hub."""

from __future__ import annotations

import os
from pathlib import Path

from sdtune.adapters.io import ADAPTER_FILE_NAME
from sdtune.errors import SdtuneError, first_line


def push_folder(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Create `repo_id` if needed and upload `folder`; returns the repo URL.

    Checks what can be checked offline first (the folder, a token), so a missing login is a
    one-line error, not a traceback from the HTTP layer.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_FILE_NAME).is_file() and not list(folder.glob("*.safetensors")):
        raise SdtuneError(f"'{folder}' has no adapter (.safetensors) to upload")
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise SdtuneError(
            "no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token"
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise SdtuneError("HF_HUB_OFFLINE is set; unset it to upload to the Hub")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            ignore_patterns=["*.tmp", "checkpoints/*"],
        )
    except Exception as exc:  # network, auth and HTTP errors of every kind
        raise SdtuneError(
            f"upload of '{folder}' to '{repo_id}' failed: {first_line(exc)}"
        ) from None
    return f"https://huggingface.co/{repo_id}"
