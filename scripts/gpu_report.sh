#!/usr/bin/env bash
# The GPU report as one command on a bare GPU machine (no network, its own torch):
#
#   bash scripts/gpu_report.sh OUT_DIR [gpu_report.py options, e.g. --commit abc1234]
#
# Installs gpu-wheels/ (made by `make gpu-wheels`) into /tmp/sdtune-site, runs every
# measurement in one process and leaves gpu-report.md, gpu-report.json, BENCHMARKS.md (with the
# report appended) and the whole log, gpu-report.log, in OUT_DIR. About 4-5 minutes on an H100
# or H200; no section runs past its budget and the whole run stops taking on sections at 330 s.
set -uo pipefail
out="${1:?usage: bash scripts/gpu_report.sh OUT_DIR [gpu_report.py options]}"
shift
mkdir -p "$out" && out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "${PYTHON:-python3}" scripts/gpu_report.py --out "$out" "$@"
} 2>&1 | tee "$out/gpu-report.log"
