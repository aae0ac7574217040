"""Run a command and report the peak memory of its whole process tree (issue 12: the test command
must fit a 16 GB machine, so the figure that matters is every process alive at once).

Every 0.5 s it sums, over the command and all its descendants, the proportional set size (PSS:
shared pages split between the processes that map them, so a model file mapped by two processes
counts once) and the resident set size (RSS), and records the peak of each sum and which
processes made it. Run with any Python; Linux only (/proc).

    python3 bench/peak_memory.py --out bench/results/test_memory.json -- scripts/test
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children(pid)
    return pids


def memory_kib(pid: int) -> tuple[int, int, str]:
    """(PSS, RSS) in KiB and a short command line; zeros for a process that just ended."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        return int(fields["Pss"].split()[0]), int(fields["Rss"].split()[0]), cmd
    except (OSError, KeyError, ValueError):
        return 0, 0, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the peaks as JSON here")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.time()
    proc = subprocess.Popen(command)
    peak = {"pss_kib": 0, "rss_kib": 0, "at_s": 0.0, "processes": []}
    timeline = []  # [seconds, PSS GiB] every 10 s, to see which phase of a long command peaks
    while proc.poll() is None:
        rows = [(pid, *memory_kib(pid)) for pid in tree(proc.pid)]
        pss, rss = sum(r[1] for r in rows), sum(r[2] for r in rows)
        if not timeline or time.time() - start - timeline[-1][0] >= 10:
            timeline.append([round(time.time() - start), round(pss / 2**20, 2)])
        if pss > peak["pss_kib"]:
            top = sorted(rows, key=lambda r: -r[1])[:6]
            peak.update(pss_kib=pss, rss_at_pss_peak_kib=rss, at_s=round(time.time() - start, 1),
                        processes=[{"pss_mib": r[1] // 1024, "cmd": r[3]} for r in top])
        peak["rss_kib"] = max(peak["rss_kib"], rss)
        time.sleep(args.interval)
    result = {"command": command, "exit": proc.returncode, "wall_s": round(time.time() - start, 1),
              "peak_pss_gib": round(peak["pss_kib"] / 2**20, 2), "peak_rss_sum_gib": round(peak["rss_kib"] / 2**20, 2),
              **peak, "timeline": timeline}
    text = json.dumps(result, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, indent=2), file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
