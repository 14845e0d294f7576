#!/usr/bin/env bash
# README command 1: pack the sample Python executable into the embedded local CAS, mount it
# lazily, run its interpreter from the mount, and print what had to be fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh >/dev/null
LAZYCAF=.venv/bin/lazycaf
SAMPLE=build/sample
if [ ! -x "$SAMPLE/bin/python3" ]; then
  echo "== building the sample executable (python + numpy) in $SAMPLE"
  .venv/bin/python scripts/build_sample.py "$SAMPLE" --force
fi
export LAZYCAF_CACHE="${LAZYCAF_CACHE:-$HOME/.cache/lazycaf/demo-host}"
echo "== packing $SAMPLE into the local CAS (${LAZYCAF_CAS:-$HOME/.cache/lazycaf/cas})"
digest=$($LAZYCAF pack "$SAMPLE" --tag sample:latest)
echo "   manifest $digest ($(du -sh "$SAMPLE" | cut -f1) tree, $(find "$SAMPLE" | wc -l) entries)"

MNT=$(mktemp -d /tmp/lazycaf-demo.XXXXXX)
cleanup() {
  $LAZYCAF umount "$MNT" 2>/dev/null || fusermount3 -u -z "$MNT" 2>/dev/null || true
  $LAZYCAF fetcher stop >/dev/null 2>&1 || true
  rmdir "$MNT" 2>/dev/null || true
}
trap cleanup EXIT
drop_cache() {  # with its index's lock file, which lives under /run for root
  .venv/bin/python -c 'import sys; from pathlib import Path
from lazycaf.host.indexlock import forget_lock
from lazycaf.host.paths import CacheLayout
forget_lock(CacheLayout(Path(sys.argv[1])).index)' "$LAZYCAF_CACHE"
  rm -rf "$LAZYCAF_CACHE"
}
$LAZYCAF fetcher stop >/dev/null 2>&1 || true
drop_cache   # start cold, so the run shows what a fresh host fetches
$LAZYCAF cache init "$LAZYCAF_CACHE" 2>/dev/null || true
echo "== mounting sample:latest at $MNT (on-demand fetching only: --no-prefetch)"
$LAZYCAF mount sample:latest "$MNT" --no-prefetch
echo "== running $MNT/bin/python3"
start=$(date +%s.%N)
"$MNT/bin/python3" -c 'import sys, json, sqlite3, ssl, numpy
print(f"   python {sys.version.split()[0]} from {sys.prefix}, numpy {numpy.__version__}")
print("   numpy says:", numpy.arange(6).reshape(2, 3).sum(axis=0).tolist())'
end=$(date +%s.%N)
python3 -c "print(f'   cold start took {$end - $start:.3f} s')"
echo "== fetched by the host daemon (the rest of the tree was never downloaded):"
$LAZYCAF stats
total=$(du -sb "$SAMPLE" | cut -f1)
fetched=$($LAZYCAF stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_fetched"])')
python3 -c "print(f'   {$fetched/1e6:.1f} MB fetched of a {$total/1e6:.1f} MB tree ({100*$fetched/$total:.0f}%)')"

echo "== unmounting: the run's access trace is merged into profile 'sample' in the CAS"
$LAZYCAF umount "$MNT"
$LAZYCAF profile show sample --top 5 | sed 's/^/   /'
echo "== a second cold host (empty cache): the mount prefetches the profile's hot set"
$LAZYCAF fetcher stop >/dev/null
drop_cache
$LAZYCAF mount sample:latest "$MNT" >/dev/null
start=$(date +%s.%N)
"$MNT/bin/python3" -c 'import json, sqlite3, ssl, numpy'
end=$(date +%s.%N)
python3 -c "print(f'   cold start with prefetch took {$end - $start:.3f} s')"
$LAZYCAF stats --json | python3 -c "$(cat <<'PY'
import json, sys
s = json.load(sys.stdin)
print(f"   {s['prefetched']} blobs prefetched, {s['misses']} on-demand misses, "
      f"{s['wait_seconds']:.3f} s spent waiting on fetches")
PY
)"
