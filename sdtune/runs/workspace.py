"""Paths inside a workspace, and nowhere else.

Everything the web app reads or writes names a path relative to the workspace. `resolve`
refuses `..`, absolute paths outside the workspace and symlinks that lead out of it, so no
request can reach a file the user did not put in the workspace.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from sdtune.errors import SdtuneError, quote_path


class OutsideWorkspace(SdtuneError):
    """A path that would leave the workspace."""


class Workspace:
    def __init__(self, root: str | Path):
        root = Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()

    def resolve(self, path: str | Path, must_exist: bool = False) -> Path:
        """`path` (relative to the workspace, or absolute inside it) as a real path inside it."""
        text = str(path).replace("\\", "/")
        if "\x00" in text:
            raise OutsideWorkspace(f"path {quote_path(text)} holds a NUL character")
        parts = PurePosixPath(text).parts
        if ".." in parts:
            raise OutsideWorkspace(
                f"path {quote_path(text)} uses '..'; name it from the workspace folder down"
            )
        candidate = Path(text) if Path(text).is_absolute() else self.root / text
        real = Path(os.path.realpath(candidate))
        if real != self.root and not real.is_relative_to(self.root):
            why = "leads out of" if not Path(text).is_absolute() else "is outside"
            raise OutsideWorkspace(
                f"path {quote_path(text)} {why} the workspace '{self.root}'; only files inside it "
                "can be used"
            )
        if must_exist and not real.exists():
            raise SdtuneError(f"'{self.relative(real)}' does not exist in the workspace")
        return real

    def relative(self, path: str | Path) -> str:
        """The workspace-relative name of a path inside it (forward slashes)."""
        real = Path(os.path.realpath(path))
        return real.relative_to(self.root).as_posix() if real != self.root else "."

    def name_of(self, path: str | Path | None) -> str | None:
        """The workspace-relative name of a path a job wrote (relative paths are the job's,
        which runs in the workspace folder), or None when it lies elsewhere."""
        if not path:
            return None
        real = Path(path) if Path(path).is_absolute() else self.root / path
        try:
            return self.relative(real)
        except ValueError:
            return None
