"""The command line: scoremerge merge | methods | demo | example | mergekit | doctor.

Every failure ends in one line on stderr: exit 2 for bad input (the message names it), 1 for a
failure of scoremerge itself (with where to report it; SCOREMERGE_DEBUG=1 shows the traceback),
130 / 143 on SIGINT / SIGTERM (a streaming merge keeps its completed shards for --resume).
"""
import argparse
import os
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path

from . import api, folders
from .backend import BACKENDS
from .config import CLI_UNSET, merge_settings_from
from .errors import BackendUnavailableError, MergeInputError, shown, shown_path

MAX_MESSAGE = 2000          # characters of one error line


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where SIGINT raises KeyboardInterrupt, so the same cleanup runs."""


def main(argv=None):
    parser = _parser()
    given = sys.argv[1:] if argv is None else list(argv)
    if given[:1] == ["mergekit"]:      # every later argument is mergekit-yaml's, --help too
        args = argparse.Namespace(run=_mergekit, mergekit_args=given[1:])
    else:
        args = parser.parse_args(given)
    args.argv = given
    args.resumable = False
    previous = _on_sigterm_raise()
    try:
        return args.run(args)
    except (MergeInputError, BackendUnavailableError) as e:
        return _fail(f"error: {e}", 2)
    except KeyboardInterrupt as e:
        hint = "; the completed shards are kept: rerun with --resume to finish" \
            if args.resumable else "; nothing was written"
        return _fail(f"interrupted{hint}", 143 if isinstance(e, _Terminated) else 130)
    except OSError as e:          # the file system refused: permissions, space, a busy file
        where = f": {shown_path(e.filename)}" if e.filename else ""
        return _fail(f"error: {e.strerror or e}{where}", 2)
    except Exception as e:  # anything else is scoremerge's own failure
        if os.environ.get("SCOREMERGE_DEBUG"):
            traceback.print_exc()
        return _fail(f"internal error: {type(e).__name__}: {shown(str(e))}; this is a bug in "
                     "scoremerge: please report it with the command that gave it "
                     "(SCOREMERGE_DEBUG=1 prints the traceback)", 1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(message, code):
    """One line on stderr, however long what it quotes (a path, a key) may be."""
    message = " ".join(message.splitlines())
    if len(message) > MAX_MESSAGE:
        message = f"{message[:MAX_MESSAGE - 200]} ... {message[-150:]}"
    print(f"scoremerge: {message}", file=sys.stderr)
    return code


def _on_sigterm_raise():
    """Install the SIGTERM handler (the main thread only can); return the one it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum, frame):
        raise _Terminated()
    return signal.signal(signal.SIGTERM, terminated)


def _parser():
    parser = argparse.ArgumentParser(prog="scoremerge", description="Merge fine-tuned models.")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    _add_merge(sub)
    sub.add_parser("methods", help="list merge methods with their options").set_defaults(
        run=_methods)
    _add_demo(sub)
    ex = sub.add_parser("example", help="write small checkpoints, merge them with every method")
    ex.add_argument("--out", default="runs/example", help="folder for checkpoints and merges")
    ex.add_argument("--seed", default=0, type=int)
    ex.set_defaults(run=_example)
    mk = sub.add_parser("mergekit", add_help=False,
                        help="run mergekit-yaml CONFIG OUT [flags] with scoremerge's methods "
                             "(score, tsv, iso_c, iso_cts, magmax) registered in mergekit")
    mk.add_argument("mergekit_args", nargs=argparse.REMAINDER)   # main() passes them on as given

    from .doctor import add_parser as add_doctor_parser    # its run returns doctor's 0 or 1
    add_doctor_parser(sub)
    return parser


def _add_merge(sub):
    m = sub.add_parser("merge", help="merge experts fine-tuned from one base model")
    m.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of these settings (flags given here override it)")
    m.add_argument("--base", help="base model: .safetensors, .pt/.bin, or HF folder")
    m.add_argument("--experts", nargs="+",
                   help="fine-tuned models, same format; or PEFT LoRA adapter folders of the base, "
                        "merged in factored form")
    m.add_argument("--method", default="score", help="merge method (see `scoremerge methods`)")
    m.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per expert: mean and linear average with them, TIES weighs "
                        "the kept values, the other methods merge the scaled task vectors")
    m.add_argument("--alpha", default=1.0, type=float, help="merged = base + alpha * tau")
    m.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN",
                   help="regular expressions; matching keys take the mean path")
    m.add_argument("--option", nargs="*", default=[], metavar="KEY=VALUE",
                   help="method options, e.g. variant=diag trim_multiplier=2.5")
    m.add_argument("--device", default=None, help="where to compute: cpu, cuda, cuda:1")
    m.add_argument("--dtype", default=None, choices=sorted(api.COMPUTE_DTYPES),
                   help="compute dtype (outputs keep the base's dtypes)")
    m.add_argument("--backend", default="auto", choices=BACKENDS + ("reference",))
    m.add_argument("--max-shard-size", default="5GB", help="shard the output above this size")
    m.add_argument("--max-gpu-memory", metavar="SIZE",
                   help="GPU memory for one streamed batch with its workspace (default: half "
                        "of what is free)")
    m.add_argument("--max-memory", metavar="SIZE",
                   help="CPU memory for the streamed batches (default: a quarter of the "
                        "machine's); mean, linear, task_arithmetic, magmax and TIES per "
                        "tensor keep to it whatever the key sizes (but for trim=exact, which "
                        "ranks one expert's float32 magnitudes of a key whole; the SVD "
                        "methods need each key whole)")
    m.add_argument("--stream", action="store_true",
                   help="require the streaming merge (used anyway whenever every input is a "
                        "safetensors checkpoint and the method merges keys independently)")
    m.add_argument("--resume", action="store_true",
                   help="finish an interrupted streaming merge into --out (same settings)")
    m.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds a previous scoremerge merge (only then)")
    m.add_argument("--allow-nonfinite", action="store_true",
                   help="write merged values that overflow the output dtype as Inf instead of "
                        "refusing")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--out", help="output folder (HF layout, safetensors)")
    m.add_argument("--out-adapter", metavar="DIR",
                   help="with LoRA experts, instead of --out: write the merged update as a PEFT "
                        "adapter folder (rank: the merged rank, at most the sum of the experts')")
    m.add_argument("--adapter-rank", type=int, metavar="N",
                   help="with --out-adapter: truncate every merged module to rank N (the "
                        "truncation error is reported)")
    m.set_defaults(run=_merge, **CLI_UNSET)      # untyped flags stay None: a --config shows through


def _add_demo(sub):
    d = sub.add_parser("demo", help="the embedded benchmark: leave-one-rotation-out merging of "
                       "digit experts with every method (trains on first use, cached)")
    d.add_argument("--out", default="runs/demo", help="folder for results.json, accuracy.png and online.png")
    d.add_argument("--seed", default=0, type=int, help="data split, initialisation and training")
    d.add_argument("--seeds", default=1, type=int,
                   help="run N seeds from --seed on; report each accuracy's mean and spread")
    d.add_argument("--device", default="cpu", help="cpu or cuda: merging and evaluation (training is always on the CPU)")
    d.add_argument("--backend", default="auto", choices=BACKENDS + ("reference",),
                   help="merge backend; `reference` runs the plain-torch per-key loops")
    d.add_argument("--quick", action="store_true",
                   help="short training and alpha grid (under 20 s on 2 cores; weaker models)")
    d.add_argument("--no-tune-alpha", action="store_true",
                   help="skip choosing alpha on the source domains' validation splits")
    d.add_argument("--cache", default=None,
                   help="folder for trained models (default: ~/.cache/scoremerge/demo)")
    d.add_argument("--no-cache", action="store_true", help="train in memory, read and write no cache")
    d.add_argument("--retrain", action="store_true", help="train again and replace the cached models")
    d.set_defaults(run=_demo)


def _merge(args):
    settings = merge_settings_from(args)
    for note in settings.notes:
        print(f"scoremerge: mergekit config: {note}", file=sys.stderr)
    args.resumable = folders.streams(settings)     # an interruption then keeps completed shards
    print(folders.merge_folders(settings))
    return 0


def _methods(args):
    for name, spec in api.methods().items():
        print(f"{name:16s} {spec.summary}")
        print(f"{'':16s} paper: {spec.paper}")
        for o in spec.options:
            allowed = f" ({' | '.join(map(str, o.choices))})" if o.choices else ""
            print(f"{'':16s} --option {o.name}={o.default}{allowed}: {o.help}")
    return 0


def _demo(args):
    from .demo import demo_config, run_demo
    from .demo.run import DEFAULT_CACHE
    if args.no_cache and args.cache is not None:
        raise MergeInputError("--cache and --no-cache contradict each other")
    if args.cache == "":
        raise MergeInputError("--cache needs a folder")
    config = demo_config(seed=args.seed, device=args.device, backend=args.backend, quick=args.quick,
                         tune_alpha=not args.no_tune_alpha)
    cache = None if args.no_cache else (DEFAULT_CACHE if args.cache is None else args.cache)
    run_demo(config, out=args.out, cache_dir=cache, retrain=args.retrain,
             command=shlex.join(["scoremerge", *args.argv]), seeds=args.seeds)
    return 0


def _mergekit(args):
    from .integrations.mergekit import run_mergekit
    try:
        return run_mergekit(args.mergekit_args)
    except ModuleNotFoundError as e:
        if e.name != "mergekit":
            raise
        raise MergeInputError(str(e)) from None


def _example(args):
    from .example import run_example
    return run_example(Path(args.out), args.seed)


if __name__ == "__main__":
    sys.exit(main())
