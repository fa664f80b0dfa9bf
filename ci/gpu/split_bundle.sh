#!/usr/bin/env bash
# Re-cut the vLLM bundle (../shared/gpu/build_bundle.sh: .gpu/p0 .gpu/p1 .gpu/p2) into 40 MiB
# pieces, so each device call's carry fits its 64 MiB beside the working tree (13 MiB of tracked
# files on 2026-12-02; the 54 MiB p0 no longer fit). Afterwards (README, "Headline"):
#   run("mkdir -p /tmp/parts && cp .gpu/p0 /tmp/parts/", carry=[".gpu/p0"])
#   run("cp .gpu/p1a /tmp/parts/p1", carry=[".gpu/p1a"])
#   run("cat .gpu/p1b >> /tmp/parts/p1", carry=[".gpu/p1b"])
#   run("bash SCRIPT", carry=[".gpu/p2", ".gpu/redis.txz", ...])   # SCRIPT sources calls.sh
# The originals move to .gpu/orig/; running it again re-cuts from there.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/orig
for p in p0 p1 p2; do [ -f ".gpu/orig/$p" ] || mv ".gpu/$p" ".gpu/orig/$p"; done
rm -f .gpu/p0 .gpu/p1a .gpu/p1b .gpu/p2 .gpu/piece*
cat .gpu/orig/p0 .gpu/orig/p1 .gpu/orig/p2 | split -b 40M -d -a 1 - .gpu/piece
[ -f .gpu/piece4 ] && { echo "split_bundle: the bundle grew past 160 MiB: cut it in five"; exit 1; }
mv .gpu/piece0 .gpu/p0 && mv .gpu/piece1 .gpu/p1a && mv .gpu/piece2 .gpu/p1b && mv .gpu/piece3 .gpu/p2
cat .gpu/p0 .gpu/p1a .gpu/p1b .gpu/p2 | xz -t -T0 - && ls -l .gpu/p0 .gpu/p1a .gpu/p1b .gpu/p2
