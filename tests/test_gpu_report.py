"""The GPU report, rehearsed on the CPU: `scripts/gpu_report.py --smoke` runs every section with
tiny models and writes both report files; the carried-wheel install never touches torch."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_report  # noqa: E402
import gpu_sections  # noqa: E402
import gpu_wheels  # noqa: E402


def run_smoke(out: Path, *options: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPTS / "gpu_report.py"), "--smoke", "--no-install"]
    cmd += ["--out", str(out), *options]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # 45 s of CPU rehearsal for a script CI never runs on a GPU
def test_smoke_report_holds_every_row_with_real_numbers(tmp_path):
    benchmarks_before = (SCRIPTS / "BENCHMARKS.md").read_bytes()
    proc = run_smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "gpu-report.json").read_text())
    rows = {row["key"]: row for row in report["rows"]}
    expected = {key for _, _, keys in gpu_sections.SECTIONS.values() for key in keys}
    assert set(rows) == expected
    for key, row in rows.items():
        if key.startswith("compile."):  # left out of --smoke by design, and said so
            assert row["status"] == "left out" and "--smoke" in row["note"]
            continue
        assert row["status"] == "ok", row
        assert isinstance(row["value"], int | float) and math.isfinite(row["value"]), row
        assert row["value"] > 0, row
    assert rows["sd2v.finite_steps"]["value"] == gpu_sections.Settings.smoke().sd2_total_steps
    assert all(rows[f"modes.{m}"]["met"] for m in gpu_sections.MODES)
    assert report["versions"]["torch"] and report["commit"]

    markdown = (tmp_path / "gpu-report.md").read_text()
    assert len({row["name"] for row in rows.values()}) == len(rows)
    for row in rows.values():
        line = next(ln for ln in markdown.splitlines() if ln.startswith(f"| {row['name']} |"))
        if row["status"] == "ok":
            assert gpu_report.format_value(gpu_sections.Row(**row)) in line
    # the appended copy is the checkout's BENCHMARKS.md plus the report; the checkout's is untouched
    appended = (tmp_path / "BENCHMARKS.md").read_text()
    assert appended == benchmarks_before.decode() + "\n" + markdown
    assert (SCRIPTS / "BENCHMARKS.md").read_bytes() == benchmarks_before


def test_a_missed_target_is_named_with_its_figure():
    rows = [
        gpu_sections.Row("inference.fused_ratio", "fused LoRA / base", 1.034, "x"),
        gpu_sections.Row("inference.live_ratio", "live LoRA / base", 1.05, "x"),
        gpu_sections.Row("memory.peak", "peak memory", None, "", "OutOfTime: over", "error"),
    ]
    assert [r.met for r in rows] == [False, True, None]
    meta = {"device": "GPU", "commit": "abc", "date": "now", "command": "c", "seconds": 1.0}
    meta |= {"smoke": False, "versions": {"torch": "2"}, "install": [], "notes": []}
    markdown = gpu_report.render_markdown(meta, rows)
    missed = markdown.split("Targets missed:")[1]
    assert "fused LoRA / base: 1.034x against within 2% of base" in missed
    assert "live LoRA" not in missed
    assert "memory.peak: OutOfTime" in markdown.split("Not measured:")[1]


def test_the_report_checks_the_targets_benchmarks_states():
    table = (SCRIPTS / "BENCHMARKS.md").read_text().split("| target | command |")[1]
    table = table.split("\n\n")[0]
    for phrase in (
        ">= 40% of the measured dense bf16 rate",
        ">= 1.3x the textbook",
        "peak <= 4 GB",
        "peak <= 10 GB, the estimate within 15%",
    ):
        assert phrase in table
    assert "within 15% of the measured peak" in table and "fused adapter within 2%" in table
    assert "live within 10%" in table
    checks = {key: check for key, (_, check) in gpu_sections.TARGETS.items()}
    edges = {
        "train.cached.fraction": (0.40, 0.399),
        "textbook.ratio_cached": (1.3, 1.29),
        "memory.peak": (4e9, 4.01e9),
        "memory.estimate_ratio": (0.851, 0.849),
        "train.cached.estimate_ratio": (1.149, 1.151),
        "inference.fused_ratio": (1.02, 1.021),
        "inference.live_ratio": (1.10, 1.101),
        "sdxl.peak": (10e9, 10.01e9),
        "sdxl.estimate_ratio": (1.15, 1.151),
    }
    assert set(edges) == set(checks)
    for key, (meets, misses) in edges.items():
        assert checks[key](meets) and not checks[key](misses), key


@pytest.mark.slow
def test_smoke_compile_section(tmp_path):
    proc = run_smoke(tmp_path, "--only", "matmul,inference,compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["key"]: r for r in json.loads((tmp_path / "gpu-report.json").read_text())["rows"]}
    assert rows["compile.ratio"]["status"] == "ok" and rows["compile.ratio"]["value"] > 0


# ---- the carried wheels --------------------------------------------------------------------------


def write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding `files`, with METADATA, WHEEL and a hashed RECORD."""
    info = f"{name}-{version}.dist-info"
    files = dict(files)
    files[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"  # fmt: skip
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def test_install_puts_the_wheels_in_their_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    write_wheel(wheels, "sdtune_probe", "1.0", {"sdtune_probe/__init__.py": b"VALUE = 42\n"})
    import yaml  # present here: a wheel of the same version is left alone, pip never runs

    (wheels / f"PyYAML-{yaml.__version__}-py3-none-any.whl").write_bytes(b"not read")
    # a spare wheel is installed only where the machine's own is missing or too old
    (wheels / "packaging-99.0-py3-none-any.whl").write_bytes(b"not read")
    spare = [{"name": "packaging", "role": "spare", "minimum": "20.0"}]
    spare.append({"name": "sdtune-probe", "role": "spare", "minimum": "0.5"})
    (wheels / "manifest.json").write_text(json.dumps({"wheels": spare}))
    lines = gpu_wheels.install_wheels(wheels, target)
    assert any("sdtune-probe 1.0: installed into" in ln for ln in lines)
    assert any(f"pyyaml {yaml.__version__}: already installed" in ln for ln in lines)
    assert any("packaging" in ln and "the machine's own (>= 20.0), kept" in ln for ln in lines)
    assert sys.path[0] == str(target)
    import sdtune_probe

    assert sdtune_probe.VALUE == 42 and Path(sdtune_probe.__file__).is_relative_to(target)
    assert sorted(p.name for p in target.iterdir()) == ["sdtune_probe", "sdtune_probe-1.0.dist-info"]  # fmt: skip
    monkeypatch.delitem(sys.modules, "sdtune_probe")


@pytest.mark.parametrize(
    "names, message",
    [
        (
            ["torch-2.14.1-cp312-cp312-manylinux_2_28_x86_64.whl"],
            "torch must come from the machine",
        ),
        (["nvidia_cublas-13.1-py3-none-any.whl"], "must come from the machine"),
        (
            ["diffusers-0.41.0-py3-none-any.whl", "diffusers-0.42.1-py3-none-any.whl"],
            "two wheels of diffusers",
        ),  # fmt: skip
        ([], "no wheels in"),
    ],
)
def test_install_refuses_torch_and_doubles(tmp_path, names, message):
    for name in names:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(gpu_wheels.WheelError, match=message):
        gpu_wheels.install_wheels(tmp_path, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_slimmed_bitsandbytes_wheel_installs_with_only_the_kept_libraries(tmp_path):
    libs = ["cpu", "cuda118", "cuda128", "cuda130", "rocm64", "xpu2026"]
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 100 for lib in libs}
    files["bitsandbytes/__init__.py"] = b"__version__ = '0.50.2'\n"
    full = write_wheel(tmp_path, "bitsandbytes", "0.50.2", files)
    slim_dir = tmp_path / "slim"
    slim_dir.mkdir()
    removed = gpu_wheels.slim_bitsandbytes(full, slim_dir / full.name, ["128", "130"])
    assert sorted(removed) == sorted(
        f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cuda118", "rocm64", "xpu2026")
    )
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    subprocess.run([*cmd, "--target", str(target), str(slim_dir / full.name)], check=True)
    kept = sorted(p.name for p in (target / "bitsandbytes").glob("*.so"))
    assert kept == [f"libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda128", "cuda130")]
    record = next(target.glob("bitsandbytes-*.dist-info")) / "RECORD"
    assert "cuda118" not in record.read_text()
