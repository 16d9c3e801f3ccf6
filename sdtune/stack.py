"""Is the installed stack one that can work? Checked when a command that needs it starts.

A fresh `pip install` can pick up a release that breaks sdtune overnight (transformers 5.24
refused every peft that existed). Rather than a traceback halfway through a run, a command
that needs torch/diffusers/transformers/peft first compares the installed versions with

- sdtune's own declared ranges (the package metadata, so pyproject.toml stays the one place
  they are written), and
- `KNOWN_CONFLICTS`: pairs of releases that refuse each other although each is in range;

and stops with one line naming the packages, their versions and the command that fixes it.
Only package metadata is read (no imports), so the check costs milliseconds. Setting
`SDTUNE_SKIP_STACK_CHECK=1` skips it, for trying versions sdtune has not been tested with.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from sdtune.errors import SdtuneError

SKIP_ENV = "SDTUNE_SKIP_STACK_CHECK"


@dataclass(frozen=True)
class Conflict:
    """`package` at versions `when` needs `other` at `needs`; `why` says what breaks."""

    package: str
    when: str
    other: str
    needs: str
    why: str
    fix: str


KNOWN_CONFLICTS = (
    Conflict(
        "transformers",
        ">=5.24",
        "peft",
        ">=0.22",
        "its PEFT integration refuses older peft, so every LoRA fails to load",
        'pip install "transformers<5.24"',
    ),
)


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def declared_requirements() -> list[Requirement]:
    """sdtune's runtime requirements as declared in its package metadata (no extras)."""
    try:
        lines = metadata.requires("sdtune") or []
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return []
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _contains(spec: str | SpecifierSet, version: str) -> bool:
    try:
        return Version(version) in SpecifierSet(str(spec), prereleases=True)
    except InvalidVersion:
        return True  # a version string packaging cannot read is not ours to judge


def find_stack_problems(
    version_of: Callable[[str], str | None] = installed_version,
    requirements: list[Requirement] | None = None,
    conflicts: tuple[Conflict, ...] = KNOWN_CONFLICTS,
) -> list[str]:
    """One line per installed combination that cannot work; [] when the stack is fine."""
    problems = []
    for c in conflicts:
        have, other = version_of(c.package), version_of(c.other)
        if have and other and _contains(c.when, have) and not _contains(c.needs, other):
            problems.append(
                f"{c.package} {have} needs {c.other}{c.needs} but {c.other} {other} is "
                f"installed ({c.why}); fix: {c.fix}"
            )
    for req in declared_requirements() if requirements is None else requirements:
        have = version_of(req.name)
        if have is None:
            problems.append(f'{req.name} is not installed; fix: pip install "{req}"')
        elif req.specifier and not _contains(req.specifier, have):
            if any(line.split(" ", 1)[0] == req.name for line in problems):
                continue  # already named by a known conflict
            problems.append(
                f"{req.name} {have} is outside the range sdtune works with ({req.specifier}); "
                f'fix: pip install "{req}"'
            )
    return problems


def check_stack(environ: Mapping[str, str] = os.environ) -> None:
    """Raise a one-line SdtuneError if the installed stack cannot work."""
    if environ.get(SKIP_ENV) == "1":
        return
    problems = find_stack_problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SdtuneError(
            f"{problems[0]}{more}; in a checkout, `make env` installs the tested set "
            f"(requirements.lock); {SKIP_ENV}=1 skips this check"
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m sdtune.stack`: print the installed versions of sdtune's stack and problems."""
    parser = argparse.ArgumentParser(prog="python -m sdtune.stack", description=main.__doc__)
    parser.parse_args(argv)
    for req in declared_requirements():
        print(f"{req.name}=={installed_version(req.name) or '(not installed)'}")
    problems = find_stack_problems()
    for line in problems:
        print(f"problem: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
