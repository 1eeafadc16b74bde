#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index, at the versions of locks/train.txt.
#
#   scripts/device-wheels.sh NAME...        downloads NAME==<locked version> (no dependencies) into .whl/
#
# The node keeps its own CUDA torch and whatever its image holds; only the named packages travel, each at the
# version CI tested (the lock), for CPython 3.12 on manylinux x86_64. Install there with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=${LOCK:-locks/train.txt}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
for name in "$@"; do
	pin=$(grep -iE "^${name}==" "$LOCK" | head -n 1 | cut -d' ' -f1)
	[[ -n $pin ]] || { echo "device-wheels: $name is not in $LOCK" >&2; exit 2; }
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --platform any -d .whl "$pin"
	echo "device-wheels: $pin"
done
