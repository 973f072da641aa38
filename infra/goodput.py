"""`python -m infra goodput <workdir> [--json]`: of the wall time a workdir's runs took, how much
trained the model (goodput), and where the rest went (badput by cause).

Computed from the event log every run appends (`infra.events`, one file per process). Process
0's events are the run's timeline; the other processes' starts and exits widen the wall time.
Per run segment (one process start to its last event):

* `steps` events (the loop writes one at each log point, and when it stops on SIGTERM) carry the
  step range since the previous one and the time it took. Less the evaluations, checkpoint
  blocking and input waits inside that interval, it is training time: *productive* when its
  steps were kept, `lost_work` when a later segment resumed from an earlier checkpoint and
  trained them again (`redone_steps` counts them);
* `start_up`: process start to the first step, less the timed set-up below; `distributed_init`,
  `restore` (or creating a fresh state), `compile`, `checkpoint` (time `save` and the final wait
  blocked the loop), `eval`, `input_wait`, `rollout` (an RL task making each step's batch with
  the current policy: generation, reference log-probabilities; work the run needs, but not the
  update, so it has its own line);
* `idle`: from a segment's last event to the next segment's start. A killed process leaves no
  event at its death, so the time it trained after its last log point is counted here too (at
  most one logging interval);
* `other`: what is left of a segment (logging, shutdown), so that productive + badput = wall.

A record the accounting cannot use (not JSON, a field missing, of the wrong type, NaN, negative
or absurdly large) is skipped, with one warning per file saying how many.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from infra import paths
from infra.errors import UserError
from infra.events import EVENTS_DIR, read_event_files, warn_skipped
from infra.jsonout import dumps
from infra.paths import PathLike

CAUSES = ("start_up", "distributed_init", "restore", "compile", "lost_work", "checkpoint",
          "eval", "input_wait", "rollout", "idle", "other")


@dataclass
class _Segment:
    """One process-0 run of the workdir: its events in order."""

    events: list[dict] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.events[0]["time"]

    @property
    def end(self) -> float:
        return self.events[-1]["time"]

    def restored_step(self) -> int:
        """The step this segment started training from (0 for a fresh start)."""
        return next((e["step"] for e in self.events if e["event"] == "restore"), 0)


def _segments(events: list[dict]) -> list[_Segment]:
    """Process 0's runs, each its own events in order, ordered by when they started (a run's
    events carry its id: clocks of successive runs may overlap by a little)."""
    runs: dict[str, _Segment] = {}
    for e in events:
        if e.get("process", 0) == 0:
            runs.setdefault(e.get("run", ""), _Segment()).events.append(e)
    for seg in runs.values():
        seg.events.sort(key=lambda e: e["time"])
    return sorted(runs.values(), key=lambda seg: seg.start)


_SETUP = ("distributed_init", "restore", "compile")
_PAUSES = ("eval", "checkpoint_save", "checkpoint_wait")  # inside the loop, not training
# The fields the accounting reads, by event: `True` for a count (an int), else seconds.
_FIELDS = {"steps": {"first": True, "last": True, "seconds": False, "input_wait_s": False},
           "restore": {"step": True, "seconds": False},
           **{name: {"seconds": False} for name in ("distributed_init", "compile", *_PAUSES)}}
_LARGEST = 1e12  # any real time, duration or step is below it: sums of them stay finite


def _usable(event: dict) -> bool:
    """Whether the accounting can use `event`: a string run id, an int process, and every field
    it reads a number in [0, _LARGEST) (so not NaN, inf or a string), an int where it counts."""
    if not isinstance(event.get("run", ""), str) or not _number(event.get("process", 0), True):
        return False
    return _number(event["time"], False) and all(
        _number(event.get(key), count) for key, count in _FIELDS.get(event["event"], {}).items())


def _number(value: object, count: bool) -> bool:
    """A count (an int) or, unless `count`, seconds; in [0, _LARGEST)."""
    kinds = int if count else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and 0 <= value < _LARGEST


def _account(seg: _Segment, resumed_at: int | None, badput: dict[str, float]) -> tuple[float, int]:
    """Add one segment's badput; returns (productive seconds, redone steps)."""
    productive, redone, accounted = 0.0, 0, 0.0
    for e in seg.events:
        if e["event"] in _SETUP or e["event"] in _PAUSES:
            cause = "checkpoint" if e["event"].startswith("checkpoint") else e["event"]
            badput[cause] += e["seconds"]
            accounted += e["seconds"]
    loop_start = next((e for e in seg.events if e["event"] == "loop_start"), None)
    boundary = loop_start["time"] if loop_start else seg.end
    before = sum(e["seconds"] for e in seg.events
                 if (e["event"] in _SETUP or e["event"] in _PAUSES) and e["time"] <= boundary)
    start_up = max(0.0, boundary - seg.start - before)
    badput["start_up"] += start_up
    accounted += start_up
    for e in (e for e in seg.events if e["event"] == "steps"):
        pauses = sum(p["seconds"] for p in seg.events
                     if p["event"] in _PAUSES and boundary < p["time"] <= e["time"])
        boundary = e["time"]
        rollout = e.get("rollout_s", 0.0)
        rollout = rollout if _number(rollout, False) else 0.0
        train = max(0.0, e["seconds"] - pauses - e["input_wait_s"] - rollout)
        badput["input_wait"] += e["input_wait_s"]
        badput["rollout"] += rollout
        accounted += train + e["input_wait_s"] + rollout
        steps = max(1, e["last"] - e["first"] + 1)
        kept = steps if resumed_at is None else max(0, min(e["last"], resumed_at) - e["first"] + 1)
        productive += train * kept / steps
        badput["lost_work"] += train * (steps - kept) / steps
        redone += steps - kept
    badput["other"] += max(0.0, seg.end - seg.start - accounted)
    return productive, redone


def compute(workdir: PathLike) -> dict:
    """`{"wall_s", "productive_s", "goodput", "badput_s": {cause: s}, "redone_steps",
    "segments"}` for every run recorded in `workdir`'s event log. Records it cannot use are
    skipped with a warning naming their file; UserError where no record is left."""
    events = _read(workdir)
    segments = _segments(events)
    badput = dict.fromkeys(CAUSES, 0.0)
    productive, redone = 0.0, 0
    for i, seg in enumerate(segments):
        nxt = segments[i + 1] if i + 1 < len(segments) else None
        p, r = _account(seg, nxt.restored_step() if nxt else None, badput)
        productive, redone = productive + p, redone + r
        if nxt is not None:
            badput["idle"] += max(0.0, nxt.start - seg.end)
    wall = max(e["time"] for e in events) - min(e["time"] for e in events)
    # other processes may have started earlier or ended later than process 0
    badput["other"] += max(0.0, wall - productive - sum(badput.values()))
    return {"wall_s": wall, "productive_s": productive,
            "goodput": productive / wall if wall > 0 else 0.0,
            "badput_s": badput, "redone_steps": redone, "segments": len(segments)}


def _read(workdir: PathLike) -> list[dict]:
    """The usable events of `workdir` (a warning per file with skipped records); UserError
    where `workdir` is no workdir or has none."""
    path = paths.path(workdir)
    if not path.exists():
        raise UserError(f"no workdir '{workdir}'; pass the workdir of a training run")
    if not path.is_dir():
        raise UserError(f"'{workdir}' is a file, not a workdir; pass the workdir of a training "
                        "run")
    events, skipped = read_event_files(workdir, _usable)
    if not events and any(skipped.values()):
        files = ", ".join(f"{n} unusable records in {f}" for f, n in skipped.items() if n)
        raise UserError(f"the event log in '{workdir}/{EVENTS_DIR}' has no usable record "
                        f"({files}): `python -m infra train` did not write it; pass the "
                        "workdir of a training run")
    if not events:
        raise UserError(f"no event log in '{workdir}/{EVENTS_DIR}'; run `python -m infra "
                        f"train` in that workdir first (runs record their events there)")
    warn_skipped(skipped)
    return events


def format_report(report: dict) -> str:
    wall = report["wall_s"] or 1.0
    lines = [f"wall time     {report['wall_s']:10.1f} s   ({report['segments']} run(s))",
             f"productive    {report['productive_s']:10.1f} s   goodput {report['goodput']:.1%}",
             "badput:"]
    for cause, seconds in sorted(report["badput_s"].items(), key=lambda kv: -kv[1]):
        if seconds > 0:
            lines.append(f"  {cause:<18}{seconds:8.1f} s   {seconds / wall:6.1%}")
    if report["redone_steps"]:
        lines.append(f"steps trained again after a restart: {report['redone_steps']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="a training workdir (its events/ log)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_cli(args) -> int:
    report = compute(args.workdir)
    print(dumps(report) if args.json else format_report(report))
    return 0
