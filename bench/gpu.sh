#!/usr/bin/env bash
# The GPU check of issue 11 (bench/gpu.py): run from anywhere, with the repo's src/ on the path.
exec env PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}" python "$(dirname "$0")/gpu.py" "$@"
