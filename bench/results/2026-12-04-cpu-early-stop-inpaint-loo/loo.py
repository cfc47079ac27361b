"""Leave-one-out over the 9 inpainting records (64 px, 6001 iterations): choose a rule on 8 by a fixed
procedure, test it on the ninth. Grid: wmv, later starts. Selection (fixed before running): among the rules
that meet the quality targets and stop >= 2x early on the 8, the smallest max gap, then fewer iterations."""
import json, sys, time
from pathlib import Path
import numpy as np
from dipfast.bench import early_stop as es

es.WINDOWS = (20, 50, 100)
es.ALPHAS = ()
es.STARTS = (0, 500, 1000, 1500, 2000)
es.THRESHOLDS = (0.0,)
es.TOLERANCES = (0.0, 0.2, 0.4)
es.PATIENCES = (100, 200, 400)
FIXED = 6001

cases = es.load_cases(Path("/work/shared/data/dip"), ["inpaint"], size=64)
records = es.record_cached(cases, FIXED, Path("/work/scratch/rec/cinp64_6001"))
print(len(cases), "cases", [c.name for c in cases], flush=True)


def choose(found):
    ok = [e for e in found if e["meets_quality"] and e["summary"]["iteration_ratio"] >= 2]
    if not ok:
        return None
    return min(ok, key=lambda e: (e["summary"]["max_gap_db"], e["summary"]["mean_stop_iteration"]))


def evaluate(spec_dict, case):
    found = es.calibrate([case], records, FIXED)
    for e in found:
        if e["spec"] == spec_dict:
            return e["summary"]
    raise KeyError(spec_dict)


rows = []
t0 = time.time()
ONLY = sys.argv[1:]  # resume: the folds still to run
for k, held in enumerate(cases):
    if ONLY and held.name not in ONLY:
        continue
    train = [c for c in cases if c is not held]
    found = es.calibrate(train, records, FIXED)
    best = choose(found)
    if best is None:
        print(held.name, "no rule meets the targets on the other 8", flush=True)
        rows.append({"held_out": held.name, "spec": None})
        continue
    s = evaluate(best["spec"], held)
    rows.append({"held_out": held.name, "spec": best["spec"], "train": best["summary"], "test": s})
    print(held.name, best["spec"], "train max gap %.2f ratio %.2f" % (best["summary"]["max_gap_db"], best["summary"]["iteration_ratio"]),
          "| test gap %.2f gain %.2f stop %d" % (s["median_gap_db"], s["mean_gain_over_fixed_db"], s["mean_stop_iteration"]), f"{time.time()-t0:.0f}s", flush=True)
final = choose(es.calibrate(cases, records, FIXED))
json.dump({"folds": rows, "chosen_on_all_9": final}, open("/work/scratch/loo/loo_" + ("_".join(ONLY) or "all") + ".json", "w"), indent=1)
print("on all 9:", final and final["spec"], final and final["summary"])
