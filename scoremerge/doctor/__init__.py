"""`scoremerge doctor`: check an install on the machine it runs on.

It reports the environment (versions, the device, the CUDA extension and its architectures,
cuSOLVER's batched eigensolver, NVRTC), which backend can run each op and why not, then runs
every op on every available backend against the float64 reference with bounds earned from the
plain-torch reference's own error (checks.py), and one merge per method through `auto`.
Exit status 0 when everything that can run agrees, 1 naming what does not. `--bench` adds a
short timing table of each fast path against the plain-torch reference (bench.py), `--json`
writes every number (rewritten after each section, so a run cut short still leaves one).

    scoremerge doctor [--device cuda:0] [--bench] [--json doctor.json]
"""
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import MergeInputError
from . import report
from .checks import availability, run_checks, run_merge_checks
from .environment import environment as environment_facts

MERGE_OPS = ("truncated_svd", "polar", "project_and_mask", "reconstruct")


def add_parser(sub):
    """The `doctor` subcommand on the CLI's subparsers."""
    d = sub.add_parser("doctor", help="check this install on this machine: versions, backends, "
                       "every kernel that can run here against the reference (exit 1 if one "
                       "disagrees)")
    d.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu)")
    d.add_argument("--bench", action="store_true",
                   help="also time each fast path against the plain-torch reference, with the "
                        "device's copy bandwidth and matmul rate measured in the same run")
    d.add_argument("--json", metavar="FILE", help="write every result to FILE as JSON")
    d.set_defaults(run=lambda args: doctor(args.device, bench=args.bench, json_path=args.json,
                                           argv=args.argv))


def doctor(device=None, *, bench=False, json_path=None, out=None, argv=None):
    """Run every check on `device` and print the report; returns the exit status (0 or 1)."""
    device = _device(device)
    run = _Run(device, json_path, out or sys.stdout, argv)
    run.environment()
    checks = run.checks()
    merges = run.merges()
    if bench:
        run.bench()
    failures = [report.failure_text(r) for r in checks + merges if not r.ok]
    run.data.update(verdict="fail" if failures else "ok", failures=failures,
                    seconds=time.perf_counter() - run.start)
    run.say(*report.verdict_lines(failures, len(checks), len(merges)))
    run.save()
    return 1 if failures else 0


class _Run:
    """One doctor run: where it prints, what it has found so far, and where that is saved."""

    def __init__(self, device, json_path, out, argv):
        self.device, self.json_path, self.out = device, json_path, out
        self.start = time.perf_counter()
        argv = sys.argv[1:] if argv is None else argv
        self.data = {"device": str(device), "command": " ".join(["scoremerge", *argv]),
                     "date": datetime.datetime.now(datetime.timezone.utc)
                     .isoformat(timespec="seconds"), "verdict": "incomplete"}

    def say(self, *lines):
        for line in lines:
            print(line, file=self.out, flush=True)

    def save(self):
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.data, indent=1, default=str) + "\n")

    def environment(self):
        env = environment_facts(self.device)
        self.table, self.auto = availability(self.device)
        self.data.update(environment=env, backends={
            op: {name: {"available": why is None, "why_not": why} for name, why in row.items()}
            for op, row in self.table.items()}, auto=self.auto)
        self.say(f"scoremerge doctor on {self.device}", "environment",
                 *report.environment_lines(env), *report.availability_lines(
                     self.table, self.auto, self.device))
        self.save()

    def checks(self):
        self.say(*report.check_header())
        group = []

        def printed(result):
            if group and (group[0].op, group[0].backend) != (result.op, result.backend):
                self.say(report.check_row(group))
                group.clear()
            group.append(result)

        results = run_checks(self.device, on_result=printed)
        if group:
            self.say(report.check_row(group))
        self.data["checks"] = [r.as_dict() for r in results]
        self.save()
        return results

    def merges(self):
        results = run_merge_checks(self.device)
        self.say(*report.merge_lines(results, _auto_text(self.auto)))
        self.data["merges"] = [r.as_dict() for r in results]
        self.save()
        return results

    def bench(self):
        from .bench import run_bench            # timing code loads only when asked for
        result = run_bench(self.device)
        self.say(*report.bench_lines(result))
        self.data["bench"] = result
        self.save()


def _auto_text(auto):
    """"torch for every op", or which ops of a merge take which backend under auto."""
    chosen = {}
    for op in MERGE_OPS:
        chosen.setdefault(auto[op], []).append(op)
    if len(chosen) == 1:
        return f"{next(iter(chosen))} for every op"
    return "; ".join(f"{name}: {', '.join(ops)}" for name, ops in chosen.items())


def _device(name):
    """The device to check: the one named, or cuda when torch sees a GPU, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise MergeInputError(f"--device {name!r} is not a device: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeInputError(f"--device {name}: torch sees no CUDA GPU "
                                  f"(torch {torch.__version__}, built for CUDA "
                                  f"{torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MergeInputError(f"--device {name}: torch sees {torch.cuda.device_count()} "
                                  f"GPU(s)")
    elif device.type != "cpu":
        raise MergeInputError(f"--device {name}: doctor checks cpu or cuda devices")
    return device
