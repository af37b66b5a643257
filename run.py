#!/usr/bin/env python
"""fedtask command line: train federations, attack them, sweep DP budgets, trace means.

    python run.py                      # = experiment --config configs/synthetic.toml
    python run.py experiment --config FILE [--set KEY=VALUE ...] [--out DIR]
    python run.py train      --config FILE [--set KEY=VALUE ...] [--out DIR]
    python run.py train      --resume DIR  [--set KEY=VALUE ...]      (experiment --resume DIR likewise)
    python run.py attack     --run DIR     [--set KEY=VALUE ...]
    python run.py dp-sweep   --config FILE --epsilons inf,16,8 [--set ...] [--out DIR]
    python run.py tracing    [--tasks 256 --dim 256 --samples 8 --k 4 --trials 4000 ...] [--out DIR]
    python run.py study      --spec FILE [--out DIR] [--workers N]
    python run.py trajectory --run DIR     [--set attack.KEY=VALUE ...] [--head-steps N]
    python run.py heads      --run DIR
    python run.py bench      [--out DIR] [--quick] [--accountants] [--peers [--peers-python PYTHON] [--threads N]]
                             [--launchers]

Every command takes -q/--quiet: only errors and the final tables (the run's run.log keeps the rest).
Bad input exits with status 2 and one line naming the key or file.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_CONFIG = "configs/synthetic.toml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")

    def with_config(p, config_required=False):
        p.add_argument("--config", default=None if config_required else DEFAULT_CONFIG, required=config_required,
                       help="TOML preset (default: %(default)s)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a dotted config key, value read as TOML (repeatable)")
        p.add_argument("--out", default=None, help="output directory (default: outputs/<config>-<timestamp>/)")

    for name, text in (("experiment", "train a federation, then attack it"), ("train", "train a federation")):
        p = sub.add_parser(name, help=text)
        with_config(p)
        p.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the interrupted run whose --out was DIR from its latest checkpoint "
                            "(federation.checkpoint_every); --set may change only where it runs and attack.*")
    p = sub.add_parser("attack", help="attack a finished run post-training")
    p.add_argument("--run", required=True, help="a run directory written by train/experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override attack.* keys")
    p = sub.add_parser("trajectory", help="attacks and generalization gaps at every encoder snapshot of a run")
    p.add_argument("--run", required=True, help="a run trained with federation.snapshot_every > 0")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override attack.* keys")
    p.add_argument("--head-steps", type=int, default=None,
                   help="steps of each task's probe head (default: the head steps an IN client took over the run)")
    p = sub.add_parser("heads", help="pairwise similarity of a run's trained task heads")
    p.add_argument("--run", required=True, help="a run directory written by train/experiment")
    p = sub.add_parser("dp-sweep", help="one federation per privacy budget, each attacked; "
                                       "re-run with the same --out to resume")
    with_config(p)
    p.add_argument("--epsilons", required=True, help="comma-separated budgets, 'inf' for no noise")
    p = sub.add_parser("tracing", help="the mean-estimation tracing analog (paper Section 4)")
    for flag, default, kind in (("tasks", 256, int), ("dim", 256, int), ("samples", 8, int), ("k", 4, int),
                                ("trials", 4000, int), ("task-std", 1.0, float), ("sample-std", 1.0, float),
                                ("seed", 0, int)):
        p.add_argument(f"--{flag}", type=kind, default=default)
    p.add_argument("--out", default=None)
    p = sub.add_parser("study", help="a grid of settings x replicate seeds, summarised across seeds")
    p.add_argument("--spec", required=True, help="study file (TOML): base, set, seeds, [[axis]]")
    p.add_argument("--out", default=None, help="output directory (default: outputs/<spec>-<timestamp>/); "
                                               "re-run with the same --out to resume")
    p.add_argument("--workers", type=int, default=0, help="worker processes for vectorized runs (default: CPUs)")
    p = sub.add_parser("bench", help="speed benchmarks: engines, Flower overhead, attack throughput")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="smaller settings, for a smoke check")
    p.add_argument("--accountants", action="store_true",
                   help="only (with --peers: also) the epsilon of RDP, PRV and PLD for the same (q, z, T, delta)")
    p.add_argument("--peers", action="store_true",
                   help="only (with --accountants: also) pfl-research beside the vectorized engine on the same work")
    p.add_argument("--peers-python", default=None, metavar="PYTHON",
                   help="interpreter that has pfl installed (default: $FEDTASK_PEERS_PYTHON, else this one)")
    p.add_argument("--launchers", action="store_true",
                   help="only the Flower engine through flwr run vs run_simulation (bench_launchers.json/.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="--peers: torch threads for both sides (default: torch's own count)")
    for command in sub.choices.values():  # every command: only errors and the final tables
        command.add_argument("-q", "--quiet", action="store_true",
                             help="print only errors and the final tables (a run's run.log still gets everything)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet = [flag for flag in argv[:1] if flag in QUIET_FLAGS]  # `run.py --quiet COMMAND ...` too
    argv = argv[len(quiet):]
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["experiment", *argv]
    args = _parser().parse_args([*argv[:1], *quiet, *argv[1:]])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from fedtask.config import ConfigError
    from fedtask.engines import TrainingFailed

    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return _exit_now(1)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): unfinished work was removed unless a checkpoint was kept (see above)",
              file=sys.stderr)
        return _exit_now(130)
    except Terminated:
        print("terminated (SIGTERM): unfinished work was removed unless a checkpoint was kept (see above)",
              file=sys.stderr)
        return _exit_now(143)


QUIET_FLAGS = ("-q", "--quiet")


def _run(args) -> int:
    """The command, with ``--quiet`` set for it; any bar it leaves is ended before an error is printed."""
    from fedtask import progress

    progress.set_quiet(getattr(args, "quiet", False))
    try:
        return _dispatch(args)
    finally:
        progress.close_all()
        progress.set_quiet(False)


class Terminated(BaseException):
    """SIGTERM, raised where the main thread is, so that cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _exit_now(status: int) -> int:
    """Stop what a Flower simulation leaves running (Ray, its non-daemon threads), then exit.

    After an interrupted or failed simulation the interpreter would wait for ever on Flower's
    threads at shutdown; the run directory is already cleaned up, so exit without waiting.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


TRACING_FLAGS = {"tasks": "--tasks", "dim": "--dim", "samples": "--samples", "k": "--k", "trials": "--trials",
                 "task_std": "--task-std", "sample_std": "--sample-std", "seed": "--seed"}


def _out_dir(out: str | None, name: str) -> Path:
    from fedtask.rundir import default_out_dir

    return Path(out) if out else default_out_dir(name)


def _dispatch(args) -> int:
    from fedtask import pipeline
    from fedtask.config import ConfigError, load_config, parameter_error

    if args.command in ("experiment", "train") and args.resume:
        if args.out or args.config != DEFAULT_CONFIG:
            raise ConfigError("--resume: continues a run with its own config and --out; leave --config and --out out")
        out = Path(args.resume)
        if args.command == "experiment" and (out / "results.json").is_file() and not pipeline.rundir.incomplete(
                out.resolve()).exists():
            pipeline.log(f"{out}: training finished already; attacking it")
        else:
            pipeline.run_training(pipeline.resume_config(out, args.set), out, resume=True)
        if args.command == "experiment":
            pipeline.run_attack(out, [item for item in args.set if item.strip().startswith("attack.")])
        return 0
    if args.command in ("experiment", "train", "dp-sweep"):
        config = load_config(args.config, args.set)
        name = Path(args.config).stem + ("-dp-sweep" if args.command == "dp-sweep" else "")
        out = _out_dir(args.out, name)
        if args.command == "experiment":
            pipeline.run_experiment(config, out)
        elif args.command == "train":
            pipeline.run_training(config, out)
        else:
            from fedtask.sweep import dp_sweep, parse_epsilons

            dp_sweep(config, parse_epsilons(args.epsilons), out)
        return 0
    if args.command == "attack":
        pipeline.run_attack(Path(args.run), args.set)
        return 0
    if args.command == "trajectory":
        from fedtask import rundir
        from fedtask.trajectory import run_trajectory

        run_trajectory(Path(args.run), overrides=args.set, head_steps=args.head_steps)
        print((Path(args.run) / rundir.TRAJECTORY_REPORT).read_text(), flush=True)
        return 0
    if args.command == "heads":
        from fedtask.heads import format_heads, run_heads

        print(format_heads(run_heads(Path(args.run))), flush=True)
        return 0
    if args.command == "tracing":
        from attacks import format_tracing, write_tracing

        out = _out_dir(args.out, "tracing")
        try:
            result = write_tracing(out, tasks=args.tasks, dim=args.dim, samples=args.samples, k=args.k,
                                   trials=args.trials, task_std=args.task_std, sample_std=args.sample_std,
                                   seed=args.seed)
        except ValueError as err:
            raise parameter_error(err, TRACING_FLAGS) from None
        print(format_tracing(result))
        pipeline.log(f"wrote {out / 'tracing.json'} and {out / 'tracing.png'}")  # quiet with --quiet
        return 0
    if args.command == "study":
        from fedtask.study import run_study

        if args.workers < 0:
            raise ConfigError(f"--workers: must be >= 0 (0 = one per CPU); got {args.workers}")
        out = Path(args.out) if args.out else _out_dir(None, Path(args.spec).stem + "-study")
        run_study(args.spec, out, workers=args.workers)
        print((out / "study.md").read_text(), flush=True)
        return 0
    if args.command == "bench":
        if args.launchers:
            if args.peers or args.accountants:
                raise ConfigError("--launchers: runs alone; run --peers/--accountants separately")
            from fedtask.bench import write_launchers

            write_launchers(_out_dir(args.out, "bench"), quick=args.quick)
            return 0
        if args.peers or args.accountants:
            from fedtask.bench_peers import run_sections

            run_sections(_out_dir(args.out, "bench"), peers=args.peers, accountants=args.accountants,
                         quick=args.quick, python=args.peers_python, threads=args.threads)
            return 0
        from fedtask.bench import run_bench

        run_bench(_out_dir(args.out, "bench"), quick=args.quick)
        return 0
    raise ConfigError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
