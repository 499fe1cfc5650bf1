#!/usr/bin/env bash
# Print exact versions for the Docker image's Python dependencies: pyproject.toml's runtime
# requirements without torch (the base image provides it), resolved by pip for Python 3.11 on
# Linux x86_64. Usage: tools/lock_docker_deps.sh > docker/constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PYTHON" - "$tmp/reqs.txt" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
keep = [d for d in deps if re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() != "torch"]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF

"$PYTHON" -m pip install -q --dry-run --ignore-installed --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any --python-version 3.11 --target "$tmp/t" \
  --report "$tmp/report.json" -r "$tmp/reqs.txt" >/dev/null

cat <<'EOF'
# Exact versions for the image's Python dependencies (everything `pip install .` pulls in, except
# torch, which comes from the base image). Used as a pip constraints file by the Dockerfile, so the
# requirements themselves still come from pyproject.toml. Refresh after changing dependencies:
#   tools/lock_docker_deps.sh > docker/constraints.txt
EOF
"$PYTHON" - "$tmp/report.json" <<'EOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
for name, version in sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"]) for i in items):
    print(f"{name}=={version}")
EOF
