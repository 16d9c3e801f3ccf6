"""The wheels a bare GPU machine lacks: download them here, install them there.

    python3 scripts/gpu_wheels.py download [--dest gpu-wheels] [--python-version 3.12]
    python3 scripts/gpu_wheels.py sizes [--dest gpu-wheels]
    python3 scripts/gpu_wheels.py install --wheels gpu-wheels --target /tmp/sdtune-site

The GPU machine's own Python already has torch (CUDA), transformers, peft, accelerate,
safetensors, pyyaml, pillow and tensorboard; sdtune needs two more for the measured paths:
diffusers (pure Python) and bitsandbytes (8-bit optimizers; CUDA libraries inside). `datasets`
is imported only for Hugging Face dataset sources, which the GPU report does not use. A peft
wheel travels as a spare: installed only if the machine's peft is missing or older than
pyproject.toml's minimum.

Everything that travels with the checkout must fit in 64 MiB. bitsandbytes' wheel carries one
native library per CUDA and ROCm release (41 MiB for 0.50.2), which with the checkout does not
fit, so `download` writes a slimmed copy that keeps only the CUDA libraries asked for
(bitsandbytes loads the nearest release of the runtime's major version) and records what it
removed in `manifest.json`. `install` never installs torch: it puts the wheels
into a folder of their own with `pip install --no-index --no-deps --target` and the machine's
torch, whatever its version, stays the one in use.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 * 2**20  # what may travel with the checkout, wheels included
# The packages the GPU machine lacks, at the versions this project is tested with (a
# requirements.lock beside pyproject.toml overrides them).
NEEDED = {"diffusers": "0.42.1", "bitsandbytes": "0.50.2"}
# Carried as well but installed only where the machine's own is missing or older than
# pyproject.toml's minimum: the machine's peft version has not been seen yet.
SPARE = {"peft": "0.21.2"}
# Never installed from the wheel folder: the machine's own build must stay in use.
FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia[-_].*|cuda[-_].*)$")
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)
BNB_LIBRARY = re.compile(r"bitsandbytes/libbitsandbytes_(cuda|rocm|xpu)(\d+)\.so$")


class WheelError(Exception):
    """A wheel folder that cannot be installed as asked."""


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalized distribution name, version) from a wheel's file name."""
    parts = path.name.split("-")
    if len(parts) < 5 or not path.name.endswith(".whl"):
        raise WheelError(f"{path.name} is not a wheel file name (name-version-...-platform.whl)")
    return parts[0].lower().replace("_", "-"), parts[1]


def locked_versions() -> dict[str, str]:
    """NEEDED and SPARE, with the versions of requirements.lock where it pins them."""
    versions = {**NEEDED, **SPARE}
    lock = REPO / "requirements.lock"
    if lock.exists():
        for line in lock.read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
            if match and match.group(1).lower() in versions:
                versions[match.group(1).lower()] = match.group(2)
    return versions


# ---- download (on a CPU machine with the package index) -------------------------------------


def download(dest: Path, python_version: str, cuda_libs: list[str]) -> dict:
    """Download the needed wheels for the GPU machine's Python into `dest`, slim bitsandbytes,
    and write manifest.json with every file's size; returns the manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        manifest = _download_into(Path(tmp), dest, python_version, cuda_libs)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _download_into(full: Path, dest: Path, python_version: str, cuda_libs: list[str]) -> dict:
    pins = [f"{name}=={version}" for name, version in locked_versions().items()]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, "-d", str(full), *pins], check=True)
    for old in dest.glob("*.whl"):
        old.unlink()  # one version of each package only: two stop the install
    manifest = {"python_version": python_version, "wheels": []}
    for wheel in sorted(full.glob("*.whl")):
        name, version = wheel_name_version(wheel)
        entry = {"name": name, "version": version, "file": wheel.name, "full_bytes": size(wheel)}
        entry["role"] = "spare" if name in SPARE else "needed"
        if name in SPARE:
            entry["minimum"] = minimum_version(name)
        entry["sha256_of_full"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if name == "bitsandbytes":
            entry["removed"] = slim_bitsandbytes(wheel, dest / wheel.name, cuda_libs)
            entry["kept_cuda_libraries"] = cuda_libs
        else:
            (dest / wheel.name).write_bytes(wheel.read_bytes())
        entry["bytes"] = size(dest / wheel.name)
        manifest["wheels"].append(entry)
    return manifest


def slim_bitsandbytes(source: Path, target: Path, cuda_libs: list[str]) -> list[str]:
    """Copy the wheel keeping, of its native libraries, only the CPU one and the CUDA ones in
    `cuda_libs` (e.g. "130" for CUDA 13.0); the wheel's RECORD loses the lines of the others,
    so pip installs exactly what is there. Returns the removed names."""
    removed = []
    with zipfile.ZipFile(source) as src:
        keep = []
        for info in src.infolist():
            match = BNB_LIBRARY.search(info.filename)
            if match and not (match.group(1) == "cuda" and match.group(2) in cuda_libs):
                removed.append(info.filename)
            else:
                keep.append(info)
        tmp = target.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in keep:
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = "\n".join(ln for ln in lines if ln.split(",")[0] not in removed)
                    data = (data + "\n").encode()
                out.writestr(info, data)
    tmp.replace(target)
    return removed


def minimum_version(name: str) -> str:
    """The lowest version pyproject.toml's dependencies accept (`name>=X`), or "0"."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(name)}\s*>=\s*([^",;\s]+)', text, re.IGNORECASE)
    return match.group(1) if match else "0"


def size(path: Path) -> int:
    return path.stat().st_size


def checkout_bytes() -> int:
    """Bytes of the files that travel with the checkout: tracked and untracked-not-ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    paths = [REPO / p for p in listed.decode().split("\0") if p]
    return sum(size(p) for p in paths if p.is_file())


def print_sizes(dest: Path) -> bool:
    """Print the size of each wheel and of the whole load against the limit; True if it fits."""
    manifest = json.loads((dest / "manifest.json").read_text())
    mib = 2**20
    wheels = 0
    for entry in manifest["wheels"]:
        wheels += entry["bytes"]
        slim = f" (full wheel {entry['full_bytes'] / mib:.1f} MiB)" if "removed" in entry else ""
        print(f"  {entry['file']:<60}{entry['bytes'] / mib:7.1f} MiB{slim}")
    tree = checkout_bytes()
    full = sum(e["full_bytes"] for e in manifest["wheels"])
    print(f"  {'checkout (tracked + untracked, not ignored)':<60}{tree / mib:7.1f} MiB")
    total = tree + wheels
    print(f"  {'total that travels':<60}{total / mib:7.1f} MiB of {LIMIT_BYTES / mib:.0f} MiB")
    print(f"  with the full wheels it would be {(tree + full) / mib:.1f} MiB: "
          f"{'fits' if tree + full <= LIMIT_BYTES else 'does not fit'}")  # fmt: skip
    return total <= LIMIT_BYTES


# ---- install (on the GPU machine, no network) -----------------------------------------------


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels(folder: Path, target: Path) -> list[str]:
    """Install the folder's wheels into `target` (no index, no dependencies, never torch) and
    put `target` first on sys.path. A package already present at the wheel's version is left
    alone, and so is a spare one (manifest.json) the machine has recent enough; `target` stays
    off the path if nothing was installed. Returns one line per wheel saying what happened."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise WheelError(f"no wheels in {folder}; make them with `make gpu-wheels` first")
    manifest = folder / "manifest.json"
    spare = {}  # name -> lowest version of the machine's own that is kept
    if manifest.exists():
        entries = json.loads(manifest.read_text())["wheels"]
        spare = {e["name"]: e["minimum"] for e in entries if e.get("role") == "spare"}
    seen, todo, lines = {}, [], []
    for wheel in wheels:
        name, version = wheel_name_version(wheel)
        if FORBIDDEN.match(name):
            raise WheelError(f"{wheel.name}: {name} must come from the machine; remove it")
        if name in seen:
            raise WheelError(f"two wheels of {name} in {folder} ({seen[name]} and {version})")
        seen[name] = version
        present = installed_version(name)
        if present == version:
            lines.append(f"{name} {version}: already installed, left as it is")
            continue
        if name in spare and present and not older(present, spare[name]):
            lines.append(f"{name} {present}: the machine's own (>= {spare[name]}), kept")
            continue
        todo.append(wheel)
        was = f", replacing {present} for this run" if present else ""
        lines.append(f"{name} {version}: installed into {target}{was}")
    if todo:
        target.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
        cmd += ["--no-compile", "--no-cache-dir", "--upgrade", "--disable-pip-version-check"]
        cmd += ["--target", str(target), *map(str, todo)]
        subprocess.run(cmd, check=True)
        if str(target) not in sys.path:
            sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    return lines


def older(version: str, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) < Version(than)
    except InvalidVersion:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    down = sub.add_parser("download", help="download and slim the wheels (needs the index)")
    down.add_argument("--dest", type=Path, default=REPO / "gpu-wheels")
    down.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    down.add_argument(
        "--cuda-libs",
        default="128,130,132",
        help="bitsandbytes CUDA libraries to keep; it loads the nearest one of the runtime's "
        "major version (the GPU machine's torch was a CUDA 13.0 build; 12.8 covers CUDA 12)",
    )
    sizes = sub.add_parser("sizes", help="sizes of the wheels and the checkout against 64 MiB")
    sizes.add_argument("--dest", type=Path, default=REPO / "gpu-wheels")
    inst = sub.add_parser("install", help="install the wheels into a folder of their own")
    inst.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels")
    inst.add_argument("--target", type=Path, default=Path("/tmp/sdtune-site"))
    args = parser.parse_args()
    try:
        if args.command == "download":
            download(args.dest, args.python_version, args.cuda_libs.split(","))
            print(f"wheels for Python {args.python_version} in {args.dest}:")
            sys.exit(0 if print_sizes(args.dest) else 1)
        if args.command == "sizes":
            sys.exit(0 if print_sizes(args.dest) else 1)
        for line in install_wheels(args.wheels, args.target):
            print(line)
    except WheelError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
