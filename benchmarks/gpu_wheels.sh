#!/usr/bin/env bash
# Ray + the serving dependencies (FastAPI, uvicorn, ...) that the lent GPU machines' image lacks, as CPython 3.12 wheels in .whl/
# (the machine has no network). Ray's wheel is trimmed of its Java jars, dashboard UI and the
# libraries coinfer does not import (rllib, tune, train, data, llm), to fit the 64 MiB the tool carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d .whl "$@"; }
dl ray==2.60.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 uvicorn==0.54.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
  referencing==0.37.0 rpds-py==2026.9.1 opentelemetry-api==1.45.2 \
  grpcio-reflection==1.85.1 grpcio==1.85.3 protobuf==7.36.2 httptools==0.9.0
python3 - <<'PY'
import glob, os, zipfile
src = glob.glob(".whl/ray-*.whl")[0]
drop = ("ray/jars/", "ray/dashboard/client/", "ray/rllib/", "ray/llm/", "ray/tune/", "ray/train/", "ray/data/")
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
    for i in zi.infolist():
        if i.filename.startswith(drop):
            continue
        data = zi.read(i.filename)
        if i.filename.endswith(".dist-info/RECORD"):
            data = ("\n".join(l for l in data.decode().splitlines() if not l.startswith(drop)) + "\n").encode()
        zo.writestr(i, data)
os.replace(tmp, src)
PY
du -sh .whl
