"""What a user sees around a job (`python -m launch.rl`, `python -m launch.pretrain`): the command
line checked before anything exists, clean errors, Ctrl-C, and no empty run directories.

- Before Hydra creates the run directory, every override's key is checked against the job's typed
  config (the dataclasses are the schema): a key it lacks is refused with or without Hydra's `+`,
  naming the nearest valid key ("did you mean rl.steps?"). Then the whole config is composed and
  converted once, so a wrong type or an unknown group option also fails before any output exists.
- An error the user caused (config, data, paths, checkpoints, reward files, cluster too small) ends
  as one line on stderr, `error: <Type>: <what to change>`, exit code 2; a run directory that holds
  nothing saved yet is removed again, with the parents this job created. `HYDRA_FULL_ERROR=1` shows
  the traceback. Anything else is a bug and keeps its traceback (exit 1).
- Ctrl-C (SIGINT) stops the job with one line naming the checkpoint to resume from, exit 130.
- A job that lost what it runs on (rollout workers or trainer ranks past their restarts, their
  node gone) ends with one line saying what was lost and one naming the checkpoint, exit 1.
- The job's console output (minus progress-bar frames) is kept in `<run dir>/<job>.log`; the run
  directory is printed first and a summary last (launch/console.py).
"""
from __future__ import annotations

import difflib
import os
import shlex
import shutil
import signal
import sys
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from launch.config import CONF_DIR

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_LOST = 1  # the job lost its workers or nodes (launch/cli.py lost_resource_types)


class UnknownConfigKeyError(ValueError):
    """A command-line key the job's typed config does not have."""


@dataclass(frozen=True)
class JobSpec:
    """One job's entry point: its config (conf/<name>.yaml over `schema`) and how to run it."""
    name: str  # the config name, the log file's stem, `python -m launch.<name>`
    schema: type
    register: Callable[[], None]  # stores the schema in Hydra's ConfigStore
    run: Callable[[Any, Path], dict]  # (typed config, run dir) -> summary
    resume_key: str  # the override that continues a run: "rl.resume" / "resume"
    summary: Callable[[dict, Path], list[str]]  # the lines printed at the end (launch/console.py)


# -- the command line, before Hydra ---------------------------------------------------------------

def schema_keys(schema: type, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of a config dataclass -> whether any sub-key is allowed under it (a plain
    dict or untyped field); nested dataclasses are walked."""
    keys: dict[str, bool] = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        hint = _unwrap_optional(hints.get(f.name, Any))
        if isinstance(hint, type) and is_dataclass(hint):
            keys[name] = False
            keys.update(schema_keys(hint, name + "."))
        else:
            keys[name] = hint is Any or typing.get_origin(hint) is dict or hint is dict
    return keys


def _unwrap_optional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def config_groups() -> set[str]:
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def check_override_keys(overrides: list[str], schema: type) -> None:
    """Refuse an override whose key the schema does not have (`x.y=1`, `+x.y=1`, `++x.y=1`,
    `~x.y`), naming the nearest valid key. Group selections (`model=hf`) and hydra.* are Hydra's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    known = schema_keys(schema)
    groups = config_groups()
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or (key in groups and override.package is None):
            continue
        if key in known or any(key.startswith(k + ".") for k, open_ in known.items() if open_):
            continue
        candidates = list(known) + sorted(groups)
        near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise UnknownConfigKeyError(f"{override.input_line!r}: the config has no key {key!r}{hint}")


@dataclass
class Preflight:
    run_dir: Path  # the run directory, absolute and normalised as Hydra makes it; Hydra is pinned to it
    existed: bool  # it existed before the job (a resume): a failure never removes it
    anchor: Path  # its deepest ancestor that exists now: cleanup never goes above it


class RunDirError(ValueError):
    """hydra.run.dir cannot be created."""


def preflight(spec: JobSpec, argv: list[str]) -> Preflight | None:
    """Check the command line the way Hydra will read it, before anything is created. Every
    override's key is checked in every mode; the whole config is composed and the run dir settled
    for a single run, and None returned for what Hydra handles itself (--help, --cfg, -m sweeps,
    another config)."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    args = get_args_parser().parse_args(argv)
    check_override_keys(args.overrides, spec.schema)
    handled_by_hydra = ("help", "hydra_help", "cfg", "info", "shell_completion", "multirun", "config_name",
                        "config_path", "config_dir", "experimental_rerun")
    if any(getattr(args, flag, None) for flag in handled_by_hydra):
        return None
    spec.register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=spec.name):
        cfg = compose(config_name=spec.name, overrides=list(args.overrides), return_hydra_config=True)
        # os.path.abspath, as Hydra: `a/../b` is b, `~` is not expanded
        run_dir = Path(os.path.abspath(str(OmegaConf.select(cfg, "hydra.run.dir"))))
        with_hydra = OmegaConf.to_container(cfg, resolve=False)
        if not isinstance(with_hydra, dict):  # compose() always gives a mapping
            raise TypeError(f"the composed {spec.name} config is a {type(with_hydra).__name__}, not a mapping")
        with_hydra.pop("hydra", None)
        OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(spec.schema), with_hydra))
    anchor = run_dir
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise RunDirError(f"hydra.run.dir={run_dir}: cannot be created ({anchor} is not a writable directory)")
    return Preflight(run_dir, run_dir.exists(), anchor)


# -- errors ----------------------------------------------------------------------------------------

def job_error_types() -> tuple[type[BaseException], ...]:
    """Errors a user causes and fixes by changing the command, the data or the files it names:
    the project's typed errors, raised where the bad input is read."""
    from data.corpus import DataError
    from data.prompts import PromptDataError
    from launch.cluster import ClusterResourceError
    from launch.loggers import LoggerConfigError
    from launch.rl_config import RLConfigError
    from launch.rl_rollouts import RolloutStartError
    from launch.trainer_group import TrainerSetupTimeout
    from models.build import ModelConfigError
    from rollout.batch import ChatTemplateError
    from rollout.config import RolloutConfigError
    from rollout.generation import SamplingConfigError
    from rollout.rewards import RewardFunctionError
    from rollout.tasks import TaskConfigError
    from trainer.algos.config import AlgoConfigError
    from trainer.checkpoint import ResumeError
    from trainer.config import TrainerConfigError
    from trainer.distill import DistillConfigError
    from trainer.sparsity.errors import SparsityConfigError
    from trainer.state_file import StateFileError

    return (DataError, PromptDataError, ClusterResourceError, LoggerConfigError, RLConfigError, RolloutStartError,
            ModelConfigError, ChatTemplateError, RolloutConfigError, SamplingConfigError, RewardFunctionError,
            TaskConfigError, AlgoConfigError, ResumeError, TrainerConfigError, DistillConfigError, SparsityConfigError,
            StateFileError, TrainerSetupTimeout)


def lost_resource_types() -> tuple[type[BaseException], ...]:
    """The job lost what it runs on (rollout workers or trainer ranks past their restarts, a node
    that died): not the user's input and not a bug; one line naming what was lost and the
    checkpoint to resume from, exit 1."""
    from launch.rl_rollouts import RolloutWorkerLost
    from launch.rl_trainers import TrainerLost

    return (RolloutWorkerLost, TrainerLost)


def command_line_error_types() -> tuple[type[BaseException], ...]:
    """What the command line itself can be wrong about (checked before the job: preflight)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (UnknownConfigKeyError, RunDirError, HydraException, OmegaConfBaseException)


def user_error(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The user's error behind `exc` (one raised inside a Ray actor arrives wrapped, its cause
    inside), or None when it is a bug."""
    for candidate in (getattr(exc, "cause", None), exc):
        if candidate is not None and isinstance(candidate, kinds):
            return candidate
    return None


def one_line(exc: BaseException) -> str:
    """`error: <Type>: <message>` on one line; Hydra's composition errors keep their cause's
    first line (it says what was wrong with the value), not their search-path listing."""
    text = str(exc).split("Config search path")[0]
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).splitlines()[0] not in text:
        text = f"{text}: {str(cause).splitlines()[0]}"
    return f"error: {type(exc).__name__}: {' '.join(text.split())}"


def show_traceback() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"



# -- the run directory -----------------------------------------------------------------------------

JOB_FILES = (".hydra", "wandb", "wandb_run_id")  # with <job>.log: what a job writes before it saves anything


def remove_unsaved_run_dir(run_dir: Path, pre: Preflight | None, log_name: str) -> bool:
    """After a user error: remove the run directory this job created if it holds only what the
    job writes before saving anything (its log, Hydra's and wandb's files), then the empty parents
    the job created (never `pre.anchor` or above). A directory that existed before the job, or
    holds anything else, stays. Returns whether it was removed."""
    if pre is None or pre.existed or run_dir != pre.run_dir or not run_dir.is_dir():
        return False
    entries = {p.name for p in run_dir.iterdir()}
    if not entries <= {*JOB_FILES, log_name}:
        return False
    for name in entries:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    run_dir.rmdir()
    parent = run_dir.parent
    while parent != pre.anchor and pre.anchor in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def resume_command(spec: JobSpec, run_dir: Path, overrides: list[str]) -> str:
    """The shell command that continues the run (quoted: overrides may hold spaces and brackets)."""
    keep = [o for o in overrides if not o.startswith(("hydra.run.dir=", f"{spec.resume_key}="))]
    return shlex.join(["python", "-m", f"launch.{spec.name}", *keep, f"{spec.resume_key}=auto",
                       f"hydra.run.dir={run_dir}"])


def interrupted_line(spec: JobSpec, run_dir: Path, overrides: list[str]) -> str:
    return f"interrupted: {resume_line(spec, run_dir, overrides)}"


def resume_line(spec: JobSpec, run_dir: Path, overrides: list[str]) -> str:
    """Which checkpoint the run saved last and the command that continues from it."""
    from trainer import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if latest is None:
        return f"no checkpoint was saved yet in {run_dir}; nothing to resume"
    return f"saved {latest}; resume with: {resume_command(spec, run_dir, overrides)}"


# -- the two halves of an entry point ----------------------------------------------------------------

@dataclass
class _Session:
    """What `main` settled for `run_job` (Hydra calls the task with the config only)."""
    preflight: Preflight | None = None
    failed: bool = False  # a sweep point failed with a user error (the sweep goes on)


_session = _Session()


def main(spec: JobSpec, hydra_main: Callable[[], Any]) -> None:
    """`python -m launch.<job>`: check the command line, pin Hydra to the run directory it
    settled on, then let Hydra run `run_job`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _session.preflight = preflight(spec, sys.argv[1:])
    except KeyboardInterrupt:
        print("interrupted before the job started; nothing was saved", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001  (classified right below)
        err = user_error(e, command_line_error_types() + job_error_types())
        if err is None or show_traceback():
            raise
        print(one_line(err), file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    if _session.preflight is not None and "'" not in str(_session.preflight.run_dir):
        # One clock: the run dir the preflight resolved (its ${now:...}) is the one Hydra uses.
        sys.argv.append(f"hydra.run.dir='{_session.preflight.run_dir}'")
    try:
        hydra_main()
    except KeyboardInterrupt:  # before the job began (Hydra's own start-up)
        print("interrupted before the job started; nothing was saved", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    if _session.failed:
        sys.exit(EXIT_USER_ERROR)


def run_job(spec: JobSpec, cfg) -> dict | None:
    """The body of the Hydra task: the typed config, the console and log file, the job, and what
    a user error or Ctrl-C turns into. In a `-m` sweep a point that fails with a user error is
    reported and the sweep goes on (the command exits 2 at the end)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from launch.console import RunConsole

    hydra_cfg = HydraConfig.get()
    run_dir = Path(os.path.abspath(hydra_cfg.runtime.output_dir))
    overrides = list(hydra_cfg.overrides.task)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    console = RunConsole(run_dir, f"{spec.name}.log")
    try:
        with console:
            try:
                summary = spec.run(cfg, run_dir)
            except KeyboardInterrupt:
                console.final(interrupted_line(spec, run_dir, overrides), error=True)
                raise SystemExit(EXIT_INTERRUPTED) from None
            except Exception as e:  # noqa: BLE001  (classified right below)
                lost = user_error(e, lost_resource_types())
                if lost is not None and not show_traceback():
                    console.final(f"{one_line(lost)}\n{resume_line(spec, run_dir, overrides)}", error=True)
                    raise SystemExit(EXIT_LOST) from None
                err = user_error(e, job_error_types())
                if err is None or show_traceback():
                    raise
                console.final(one_line(err), error=True)
            else:
                console.final("\n".join(spec.summary(summary, run_dir)))
                return summary
    finally:
        console.close()
    remove_unsaved_run_dir(run_dir, _session.preflight, f"{spec.name}.log")
    if sweep:
        _session.failed = True
        return None
    sys.exit(EXIT_USER_ERROR)
