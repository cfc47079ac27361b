"""The Markdown table of a tiles_vs_whole.py --stop auto run: each side's returned output where its own
criterion stopped it, the iterations, the tiles' own stops and the time.

    python table.py tiles_vs_whole.jsonl
"""

import json
import statistics
import sys
from pathlib import Path


def _mean_tile_iterations(tiled: dict) -> float:
    """Iterations a tile ran on average: the sum over tiles over the number of tiles (one restart)."""
    return tiled["tile_iterations"] / len(tiled["tile_stop_iterations"][0])


def main(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    columns = ("image", "whole", "tiles", "tiles - whole", "whole stop", "tiles' stops", "whole s", "tiles s", "ratio")
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for r in rows:
        w, t = r["whole"], r["tiled"]
        stops = ", ".join(str(s) for s in t["tile_stop_iterations"][0])
        print(
            f"| {r['image']} | {w['psnr']:.2f} | {t['psnr']:.2f} | {t['psnr'] - w['psnr']:+.2f} | {w['iterations']} "
            f"| {stops} | {w['seconds']:.0f} | {t['seconds']:.0f} | {t['seconds'] / w['seconds']:.2f} |"
        )
    gaps = [r["tiled"]["psnr"] - r["whole"]["psnr"] for r in rows]
    ema = [r["tiled"]["ema_psnr"] - r["whole"]["ema_psnr"] for r in rows]
    time = [r["tiled"]["seconds"] / r["whole"]["seconds"] for r in rows]
    work = [_mean_tile_iterations(r["tiled"]) / r["whole"]["iterations"] for r in rows]
    print(
        f"\n{len(rows)} images: tiles - whole {min(gaps):+.2f} to {max(gaps):+.2f} dB "
        f"(median {statistics.median(gaps):+.2f}, mean {statistics.mean(gaps):+.2f}); "
        f"EMA {min(ema):+.2f} to {max(ema):+.2f}; "
        f"time {min(time):.2f}-{max(time):.2f}x (median {statistics.median(time):.2f}x); "
        f"a tile's mean iterations over the whole fit's {min(work):.2f}-{max(work):.2f} "
        f"(median {statistics.median(work):.2f})"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
