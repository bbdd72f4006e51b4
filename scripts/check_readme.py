"""Check README.md's commands as a user pastes them, so the README cannot drift from the code.

    .venv/bin/python scripts/check_readme.py          # every job command's config composes (seconds)
    .venv/bin/python scripts/check_readme.py --run    # and every job runs to exit 0 (~15-25 min on 2 cores)
    .venv/bin/python scripts/check_readme.py --run --cluster   # plus the cluster block (ray start / submit / stop)

Every fenced `bash` block is read; continued lines are joined, comments dropped, `a && b` split.
A command runs a job when it is `python -m launch.rl|launch.pretrain ...` (or `ray job submit ...
-- python -m launch...`); `python examples/...` commands run as written (they make inputs later
commands use). The quick start (`scripts/setup.sh`) is what the check assumes has run; the sync
CLI, benchmarks and `pytest` have their own tests and are listed as not run.

What the check changes, and only this:
- placeholders for the user's own files become stand-ins: `/models/my-llama` (and the README's
  own `/tmp/tiny-llama`) the tiny Llama that `examples/arith/make_data.py --tiny-hf` writes,
  `prompts.parquet` and `my_rewards.py` the arith
  example's, `/data/corpus/**/*.txt` and `~/corpus/**/*.txt` a folder of text files, `<dir>` the run
  directory of the README's first RL command, other run directories a temporary folder;
- counts are lowered so each job takes seconds (appended overrides win in Hydra): RL
  `rl.steps=3 rl.sft_warmup_steps=2`, evaluation every 2 steps where the command evaluates;
  pretraining `trainer.max_steps=4 trainer.eval_every=2 trainer.eval_batches=2`; and, for the tiny
  stand-in model (context 64), `rollout.max_new_tokens=8` and `trainer.seq_len=32` where the
  command asks for more; the cluster block's `cluster.trainers=8` becomes 2 (this machine's cores).
Every run's output goes to a temporary directory; `--keep` keeps it. Exit status 1 when any
command fails.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
JOBS = {"launch.rl": "rl", "launch.pretrain": "pretrain"}
RL_LOWER = ["rl.steps=3", "rl.sft_warmup_steps=2"]
PRETRAIN_LOWER = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval_batches=2", "trainer.log_every=1"]


@dataclass
class Command:
    line: int  # README line the command starts on
    text: str  # as written (continuations joined)
    argv: list[str]
    kind: str  # job | input | cluster | not-run
    job: str | None = None  # rl | pretrain
    overrides: list[str] = field(default_factory=list)


def readme_commands(path: Path = README) -> list[Command]:
    """Every command of every fenced bash block, in order."""
    lines = path.read_text().splitlines()
    commands: list[Command] = []
    in_block, pending, start = False, "", 0
    for number, raw in enumerate(lines, 1):
        if raw.strip().startswith("```"):
            in_block = raw.strip() == "```bash" if not in_block else False
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        tokens = shlex.split(pending, comments=True)
        pending = ""
        for part in _split_and(tokens):
            commands.append(classify(start, part))
    return commands


def _split_and(tokens: list[str]) -> list[list[str]]:
    parts: list[list[str]] = []
    current: list[str] = []
    for t in tokens:
        if t == "&&":
            parts.append(current)
            current = []
        else:
            current.append(t)
    return [p for p in [*parts, current] if p]


def classify(line: int, argv: list[str]) -> Command:
    text = shlex.join(argv)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):  # `VAR=value python ...`
        argv = argv[1:]
    python = argv[0] in ("python", "python3", ".venv/bin/python")
    if python and len(argv) > 2 and argv[1] == "-m" and argv[2] in JOBS:
        return Command(line, text, argv, "job", JOBS[argv[2]], argv[3:])
    if argv[:3] == ["ray", "job", "submit"] and "--" in argv:
        inner = argv[argv.index("--") + 1:]
        return Command(line, text, argv, "cluster", JOBS.get(inner[2]) if len(inner) > 2 else None, inner[3:])
    if argv[0] == "ray" or (argv[0] == "source"):
        return Command(line, text, argv, "cluster")
    if python and len(argv) > 1 and argv[1].startswith("examples/"):
        return Command(line, text, argv, "input")
    return Command(line, text, argv, "not-run")


# -- what the check changes -----------------------------------------------------------------------

@dataclass
class Standins:
    work: Path
    tiny_model: Path
    corpus: Path
    first_rl_run: Path | None = None
    runs: int = 0

    def next_run_dir(self) -> Path:
        self.runs += 1
        return self.work / "runs" / f"{self.runs:02d}"


def substitute(overrides: list[str], s: Standins) -> list[str]:
    out = []
    for o in overrides:
        o = o.replace("/models/my-llama", str(s.tiny_model)).replace("/tmp/tiny-llama", str(s.tiny_model))
        o = o.replace("task.path=prompts.parquet", f"task.path={ROOT / 'examples/arith/train.parquet'}")
        o = o.replace("my_rewards.py:score", str(ROOT / "examples/arith/reward.py") + ":score")
        o = re.sub(r"(/data/corpus|~/corpus)/\*\*/\*\.txt", f"{s.corpus}/**/*.txt", o)
        if o.startswith("hydra.run.dir="):
            value = o.split("=", 1)[1]
            if value == "<dir>":
                if s.first_rl_run is None:
                    raise RuntimeError("`hydra.run.dir=<dir>` before any RL run to continue")
                o = f"hydra.run.dir={s.first_rl_run}"
            else:
                o = f"hydra.run.dir={s.next_run_dir()}"
        out.append(o)
    return out


def lowered(job: str, overrides: list[str]) -> list[str]:
    """The overrides appended to make the job short; values the command set larger are lowered."""
    given = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("+", "~")))
    extra = list(RL_LOWER if job == "rl" else PRETRAIN_LOWER)
    if job == "rl" and given.get("rl.eval_every", "0") != "0":
        extra.append("rl.eval_every=2")
    if _largest(given.get("rollout.max_new_tokens")) > 8:
        extra.append("rollout.max_new_tokens=8")
    if _largest(given.get("trainer.seq_len")) > 32:
        extra.append("trainer.seq_len=32")
    return extra


def _largest(value: str | None) -> int:
    """The largest integer in an override's value (`128`, a sweep's `64,128`); 0 when none."""
    return max((int(v) for v in re.findall(r"\d+", value or "")), default=0)


def job_argv(cmd: Command, s: Standins) -> tuple[list[str], Path | None]:
    """The job's full command line under the check, and its run directory."""
    if cmd.job is None:
        raise ValueError(f"README:{cmd.line} runs no job: {cmd.text}")
    overrides = substitute(cmd.overrides, s)
    if cmd.kind == "cluster":
        overrides = [("cluster.trainers=2" if o == "cluster.trainers=8" else o) for o in overrides]
    sweep = bool({"-m", "--multirun"} & set(overrides))
    run_dir = None
    if sweep:
        overrides.append(f"hydra.sweep.dir={s.next_run_dir()}")
    elif not any(o.startswith("hydra.run.dir=") for o in overrides):
        run_dir = s.next_run_dir()
        overrides.append(f"hydra.run.dir={run_dir}")
    else:
        run_dir = Path(next(o for o in overrides if o.startswith("hydra.run.dir=")).split("=", 1)[1])
    return [sys.executable, "-m", f"launch.{cmd.job}", *overrides, *lowered(cmd.job, overrides)], run_dir


def make_standins(work: Path) -> Standins:
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sorted((ROOT / "launch").glob("*.py"))):
        shutil.copy(src, corpus / f"{i:02d}.txt")
    tiny = work / "tiny-llama"
    subprocess.run([sys.executable, str(ROOT / "examples/arith/make_data.py"), "--out", str(work / "arith"),
                    "--tiny-hf", str(tiny)], check=True, capture_output=True, cwd=ROOT)
    return Standins(work, tiny, corpus)


# -- the two modes ------------------------------------------------------------------------------------

def compose_all(commands: list[Command]) -> list[tuple[Command, str | None]]:
    """Every job command's overrides through the job's own command-line check (launch/cli.py):
    unknown keys, wrong types, unknown group options. Returns (command, error or None)."""
    from launch import pretrain, rl
    from launch.cli import preflight

    specs = {"rl": rl._job_spec(), "pretrain": pretrain._job_spec()}
    results: list[tuple[Command, str | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        s = Standins(Path(tmp), Path(tmp) / "tiny-llama", Path(tmp) / "corpus", first_rl_run=Path(tmp) / "first")
        for cmd in commands:
            if cmd.job is None:
                continue
            argv, _ = job_argv(cmd, s)
            try:
                for overrides in sweep_points(argv[3:]):
                    preflight(specs[cmd.job], overrides)
                results.append((cmd, None))
            except Exception as e:  # noqa: BLE001  (reported per command)
                results.append((cmd, f"{type(e).__name__}: {e}"))
    return results


def sweep_points(args: list[str]) -> list[list[str]]:
    """A `-m` sweep's command line as one command line per swept value (`k=a,b` -> `k=a`, `k=b`);
    a plain command line as itself."""
    if not {"-m", "--multirun"} & set(args):
        return [args]
    choices = []
    for a in args:
        if a in ("-m", "--multirun"):
            continue
        key, _, value = a.partition("=")
        swept = "," in value and not value.startswith(("[", "{", "'", '"'))
        choices.append([f"{key}={v}" for v in value.split(",")] if swept else [a])
    return [list(point) for point in itertools.product(*choices)]


def run_all(commands: list[Command], work: Path, cluster: bool, timeout_s: float) -> list[dict]:
    s = make_standins(work)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    results = []
    for cmd in commands:
        if cmd.kind == "not-run" or (cmd.kind == "cluster" and not cluster):
            results.append({"line": cmd.line, "command": cmd.text, "status": "not run"})
            continue
        if cmd.kind == "input":
            argv = [sys.executable, *[a.replace("/tmp/tiny-llama", str(s.tiny_model)) for a in cmd.argv[1:]]]
            run_dir = None
        elif cmd.kind == "cluster" and cmd.job is None:
            cluster_cmd = cluster_argv(cmd)
            if cluster_cmd is None:
                results.append({"line": cmd.line, "command": cmd.text, "status": "not run (another node, or the venv's activation)"})
                continue
            argv, run_dir = cluster_cmd, None
        else:
            argv, run_dir = job_argv(cmd, s)
            if cmd.kind == "cluster":
                argv = ["ray", "job", "submit", "--working-dir", ".", "--", "python", *argv[1:], "cluster.address=auto"]
        started = time.time()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            proc = subprocess.CompletedProcess(argv, 124, out, f"timed out after {timeout_s:.0f} s")
        if cmd.job == "rl" and s.first_rl_run is None and run_dir is not None:
            s.first_rl_run = run_dir
        results.append({"line": cmd.line, "command": cmd.text, "ran": shlex.join(argv), "rc": proc.returncode,
                        "wall_s": round(time.time() - started, 1),
                        "status": "ok" if proc.returncode == 0 else "FAILED",
                        **({} if proc.returncode == 0 else {"tail": (proc.stdout + proc.stderr)[-2000:]})})
        print(f"{results[-1]['status']:6s} {results[-1]['wall_s']:6.1f} s  README:{cmd.line}  {cmd.text[:110]}",
              flush=True)
    return results


def cluster_argv(cmd: Command) -> list[str] | None:
    """`ray start --head` on 127.0.0.1 (this machine only); the other nodes' line is not run."""
    argv = [a for a in cmd.argv if a not in ("source", ".venv/bin/activate")]  # PATH has the venv already
    if not argv:
        return None
    if argv[:2] == ["ray", "start"]:
        if "--head" not in argv:
            return None
        return [*argv, "--node-ip-address=127.0.0.1", "--num-cpus=4"]
    return argv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run every job (step counts lowered), not only compose")
    parser.add_argument("--cluster", action="store_true", help="also the cluster block (starts and stops a local Ray head)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--lines", type=lambda v: {int(x) for x in v.split(",")}, default=None,
                        help="only the commands starting on these README lines, e.g. 83,126")
    args = parser.parse_args()
    commands = readme_commands()
    if args.lines:
        commands = [c for c in commands if c.line in args.lines]
    if not args.run:
        n_failed = 0
        for cmd, error in compose_all(commands):
            n_failed += error is not None
            print(f"{'ok' if error is None else 'FAILED':6s} README:{cmd.line}  {cmd.text[:100]}"
                  + ("" if error is None else f"\n       {error}"))
        return 1 if n_failed else 0
    work = Path(tempfile.mkdtemp(prefix="readme-check-"))
    try:
        results = run_all(commands, work, args.cluster, args.timeout)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r["status"] == "FAILED"]
    for r in failed:
        print(f"\nFAILED README:{r['line']}: {r['ran']}\n{r['tail']}")
    print(f"\n{sum(r['status'] == 'ok' for r in results)} ok, {len(failed)} failed, "
          f"{sum(r['status'].startswith('not run') for r in results)} not run")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
