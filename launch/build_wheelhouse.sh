#!/usr/bin/env bash
# Builds a wheelhouse for a GPU node with no network: this project's wheel plus every dependency, resolved for the
# node's Python and platform (not this machine's).
#
#   bash launch/build_wheelhouse.sh OUT_DIR [PYTHON_VERSION] [PLATFORM] [extra requirement ...]
#   bash launch/build_wheelhouse.sh wheels 3.12 manylinux_2_28_x86_64 deepspeed==0.19.8 torch-fidelity
#
# Environment: SKIP (default "torch triton nvidia-* cuda-*"): package-name patterns left out because the node's
# image already has its CUDA torch stack; set SKIP="" to include them. EXTRAS (e.g. "fid"): this project's extras.
#
# Copy OUT_DIR to the cluster, then on the node (no network):
#   python3 -m venv --system-site-packages .venv && . .venv/bin/activate      # reuse the image's torch
#   pip install --no-index --find-links OUT_DIR diffqat deepspeed
#
# Binary wheels only, except for packages that ship only source archives whose wheel is pure Python (deepspeed):
# those are built here with --no-deps first, then resolved like the rest.
set -euo pipefail
out=${1:?usage: build_wheelhouse.sh OUT_DIR [PYTHON_VERSION] [PLATFORM] [extra requirement ...]}
pyver=${2:-3.12}
platform=${3:-manylinux_2_28_x86_64}
shift $(( $# < 3 ? $# : 3 ))
skip=${SKIP-"torch triton nvidia-* cuda-*"}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
plats=(--platform "$platform")
case "$platform" in  # a manylinux_2_28 node also installs the older manylinux tags
  manylinux_2_28_x86_64) plats+=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64) ;;
  manylinux_2_28_aarch64) plats+=(--platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64) ;;
esac
target=(--python-version "$pyver" --implementation cp --only-binary=:all: "${plats[@]}")

# 1. this project as a wheel (pure Python), and pure-Python wheels of source-only extras
python3 -m pip wheel -q --no-deps -w "$out" "$repo"
reqs=("diffqat${EXTRAS:+[$EXTRAS]} @ file://$(ls "$out"/diffqat-*.whl | head -n1)")
for req in "$@"; do
  case "$req" in
    deepspeed*) DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$req"
                reqs+=("deepspeed @ file://$(ls "$out"/deepspeed-*.whl | head -n1)") ;;
    *) reqs+=("$req") ;;
  esac
done

# 2. resolve the whole set for the target interpreter and platform (nothing is installed)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m pip install -q --dry-run --ignore-installed --target "$scratch/t" --report "$scratch/report.json" \
  "${target[@]}" "${reqs[@]}"

# 3. download every resolved package that is not skipped and not already built above
python3 - "$scratch/report.json" "$skip" "$out" > "$scratch/pins.txt" <<'PY'
import fnmatch, json, sys
report, skip, out = json.load(open(sys.argv[1])), sys.argv[2].split(), sys.argv[3]
for item in report["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if item.get("download_info", {}).get("url", "").startswith(f"file://{out}/"):
        continue  # built in step 1
    if any(fnmatch.fnmatch(name.lower(), pattern) for pattern in skip):
        continue
    print(f"{name}=={version}")
PY
python3 -m pip download -q --no-deps "${target[@]}" -d "$out" -r "$scratch/pins.txt"
echo "wheelhouse: $(ls "$out" | wc -l) wheels in $out for CPython $pyver on $platform (skipped: ${skip:-nothing})"
