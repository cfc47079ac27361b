"""Leave-one-out over the 9 inpainting records (64 px, 6001 iterations): choose a rule on 8 by a fixed
procedure, test it on the ninth. Grid: wmv, later starts. Selection (fixed before running): among the rules
that meet the quality targets and stop >= 2x early on the 8, the smallest max gap, then fewer iterations.

    python loo.py DATA CACHE [IMAGE ...]

DATA: the paper's images (../shared/data/dip); CACHE: the `--cache` folder of the 6001-iteration records;
IMAGE: only these folds (the run was resumed so). Writes loo_<images or all>.json beside this file.
"""

import json
import sys
import time
from pathlib import Path

from dipfast.bench import early_stop as es

es.WINDOWS = (20, 50, 100)
es.ALPHAS = ()
es.STARTS = (0, 500, 1000, 1500, 2000)
es.THRESHOLDS = (0.0,)
es.TOLERANCES = (0.0, 0.2, 0.4)
es.PATIENCES = (100, 200, 400)
FIXED = 6001

if len(sys.argv) < 3:
    sys.exit(__doc__)
data, cache, *only = sys.argv[1:]
cases = es.load_cases(Path(data), ["inpaint"], size=64)
records = es.record_cached(cases, FIXED, Path(cache))
print(len(cases), "cases", [c.name for c in cases], flush=True)


def choose(found):
    ok = [e for e in found if e["meets_quality"] and e["summary"]["iteration_ratio"] >= 2]
    if not ok:
        return None
    return min(ok, key=lambda e: (e["summary"]["max_gap_db"], e["summary"]["mean_stop_iteration"]))


def evaluate(spec_dict, case):
    for e in es.calibrate([case], records, FIXED):
        if e["spec"] == spec_dict:
            return e["summary"]
    raise KeyError(spec_dict)


rows = []
t0 = time.time()
for held in cases:
    if only and held.name not in only:
        continue
    best = choose(es.calibrate([c for c in cases if c is not held], records, FIXED))
    if best is None:
        print(held.name, "no rule meets the targets on the other 8", flush=True)
        rows.append({"held_out": held.name, "spec": None})
        continue
    s = evaluate(best["spec"], held)
    rows.append({"held_out": held.name, "spec": best["spec"], "train": best["summary"], "test": s})
    train = best["summary"]
    print(
        held.name,
        best["spec"],
        f"train max gap {train['max_gap_db']:.2f} ratio {train['iteration_ratio']:.2f}",
        f"| test gap {s['median_gap_db']:.2f} gain {s['mean_gain_over_fixed_db']:.2f}",
        f"stop {s['mean_stop_iteration']:.0f}",
        f"{time.time() - t0:.0f}s",
        flush=True,
    )
final = choose(es.calibrate(cases, records, FIXED))
out = Path(__file__).with_name(f"loo_{'_'.join(only) or 'all'}.json")
out.write_text(json.dumps({"folds": rows, "chosen_on_all_9": final}, indent=1))
print("on all 9:", final and final["spec"], final and final["summary"])
