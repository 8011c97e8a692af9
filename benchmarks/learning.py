"""Does PPO learn DoorKey-5x5? Frames until the mean return of the last 100 episodes reaches 0.9.

    python benchmarks/learning.py [--seeds 1 2 3] [--cores lstm rims] [--frames lstm=100000 rims=150000]

Goal: median over 3 seeds reaches 0.9 within 100k frames with LSTMCore and 150k with RIMs
(shipped configs configs/minigrid/doorkey-<core>-ppo.yaml).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _common import config_for, train_and_read

THRESHOLD = 0.9
BUDGET = {"lstm": 100_000, "gru": 100_000, "rims": 150_000, "brims": 150_000, "thalnet": 150_000}


def frames_to_threshold(rows: list[dict]) -> int | None:
    """Frames at the first update whose mean over a full window of 100 episodes reaches THRESHOLD."""
    episodes = 0
    for row in rows:
        episodes += int(row.get("rollout/episodes") or 0)
        if episodes >= 100 and (row.get("rollout/ep_return_mean") or 0) >= THRESHOLD:
            return row["frames"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cores", nargs="+", default=["lstm", "rims"])
    parser.add_argument("--frames", nargs="*", default=[], metavar="CORE=N", help="override a core's frame budget")
    args = parser.parse_args()
    budget = dict(BUDGET)
    budget.update({k: int(float(v)) for k, v in (item.split("=") for item in args.frames)})

    print(f"{'core':<9}{'seed':>5}{'budget':>9}{'frames to 0.9':>15}{'final return':>14}{'fps':>7}")
    for core in args.cores:
        reached = []
        for seed in args.seeds:
            config = config_for(core, "doorkey", [f"seed={seed}", f"total_frames={budget[core]}"])
            with tempfile.TemporaryDirectory() as tmp:
                rows = train_and_read(config, Path(tmp))
            hit = frames_to_threshold(rows)
            reached.append(hit if hit is not None else float("inf"))
            final = next((r["rollout/ep_return_mean"] for r in reversed(rows) if r.get("rollout/ep_return_mean")), 0)
            fps = statistics.median(r["time/fps"] for r in rows)
            print(f"{core:<9}{seed:>5}{budget[core]:>9}{hit if hit else 'not reached':>15}{final:>14.3f}{fps:>7.0f}",
                  flush=True)
        median = statistics.median(reached)
        verdict = "meets" if median <= budget[core] else "misses"
        print(f"{core:<9}{'median':>5}{budget[core]:>9}{median:>15}  {verdict} the goal", flush=True)


if __name__ == "__main__":
    main()
