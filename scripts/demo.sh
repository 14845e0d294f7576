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
$LAZYCAF fetcher stop >/dev/null 2>&1 || true
rm -rf "$LAZYCAF_CACHE"   # start cold, so the run shows what a fresh host fetches
$LAZYCAF cache init "$LAZYCAF_CACHE" 2>/dev/null || true
echo "== mounting sample:latest at $MNT"
$LAZYCAF mount sample:latest "$MNT"
echo "== running $MNT/bin/python3"
start=$(date +%s.%N)
"$MNT/bin/python3" -c 'import sys, json, sqlite3, ssl, numpy
print(f"   python {sys.version.split()[0]} from {sys.prefix}, numpy {numpy.__version__}")
print("   numpy says:", numpy.arange(6).reshape(2, 3).sum(axis=0).tolist())'
end=$(date +%s.%N)
echo "   cold start took $(echo "$end - $start" | bc 2>/dev/null || python3 -c "print(round($end-$start,3))") s"
echo "== fetched by the host daemon (the rest of the tree was never downloaded):"
$LAZYCAF stats
total=$(du -sb "$SAMPLE" | cut -f1)
fetched=$($LAZYCAF stats --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_fetched"])')
python3 -c "print(f'   {$fetched/1e6:.1f} MB fetched of a {$total/1e6:.1f} MB tree ({100*$fetched/$total:.0f}%)')"
