#!/bin/bash
# The denoising records gate_calibration.py replays, in two queues of one core each (about 3 h on
# 2 EPYC cores in fp32; the 128 px set alone is 109 min).   bash record.sh ../shared/data/dip RECORDS
set -u
data=$1 records=$2
es() { python -m dipfast.cli bench early-stop --data "$data" --threads 1 --quiet "$@"; }
export OMP_NUM_THREADS=1
(
    es --size 64 --iters 1000 --cache "$records/c64" --out "$records/o64"
    es --size 32 --iters 800 --cache "$records/c32" --out "$records/o32"
    es --size 64 --iters 1000 --sigma 50 --cache "$records/c64s50" --out "$records/o64s50"
    es --size 64 --iters 1000 --sigma 15 --cache "$records/c64s15" --out "$records/o64s15"
) &
(
    es --size 96 --iters 1000 --cache "$records/c96" --out "$records/o96"
    es --size 128 --iters 1200 --cache "$records/c128" --out "$records/o128"
) &
wait
# barbara's tiles: ../2026-12-03-cpu-tiles-9-images-auto-stop/tile_records.py ../shared/data/dip barbara 2000,
# its cache (tile-records-cache) moved to RECORDS/tiles
