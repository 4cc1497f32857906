#!/bin/bash
# Build source trees for A/B runs under bench/.work/src: `base` (HEAD's services/ and shared/), one folder per
# bench/proposals/<name>.diff, and `all` (aiohttp + asgi + commit: the `proposed` column), plus aiohttp for
# the worker in bench/.work/pylib. Then, e.g.:
#   .venv/bin/python bench/run.py --repo bench/.work/src/base \
#       --variant proposed=bench/.work/src/all:bench/.work/pylib
# Uses patch(1), not `git apply`: bench/.work lies inside the repository, where git apply would skip the files.
set -euo pipefail
bench="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$bench")"
work="$bench/.work"
mkdir -p "$work"
rm -rf "$work/src.new" && mkdir -p "$work/src.new/base"
git -C "$repo" archive HEAD shared services switchyard | tar -x -C "$work/src.new/base"
for d in "$bench"/proposals/*.diff; do
  v=$(basename "$d" .diff)
  cp -r "$work/src.new/base" "$work/src.new/$v"
  (cd "$work/src.new/$v" && patch -s -p1 --no-backup-if-mismatch < "$d")
done
cp -r "$work/src.new/base" "$work/src.new/all"
for v in aiohttp asgi commit; do
  (cd "$work/src.new/all" && patch -s -p1 --no-backup-if-mismatch < "$bench/proposals/$v.diff")
done
rm -rf "$work/src" && mv "$work/src.new" "$work/src"
if [ ! -d "$work/pylib/aiohttp" ]; then
  "$repo/.venv/bin/pip" install -q --target "$work/pylib" aiohttp
fi
echo "built on $(git -C "$repo" rev-parse --short HEAD): $(ls "$work/src" | tr '\n' ' ')"
