"""`python -m infra <command>`: thin wrappers over library functions.

  train  --config experiments/lm.py:tiny --workdir runs/x [--cpu_devices 8] [--config.k=v ...]
  list   every experiment and its variants
  smoke  [experiments/x.py ...]  run each experiment's `smoke` variant on 8 emulated CPU devices
  plan   --config experiments/lm.py:8b --devices 256 --mesh fsdp=256  memory/FLOPs/cost estimate
  plot   runs/a [runs/b ...] [--out loss.png]  loss vs step and vs tokens seen, one PNG
  generate --workdir runs/x --prompt "def " [--temperature 0.8 --top_k 40]  sample from a run
  serve  --workdir runs/x [--host 127.0.0.1 --port 8000 --slots 8]  OpenAI-compatible server
  eval   --workdir runs/x [--step N]  eval metrics of a checkpoint (read-only), one JSON line
  goodput runs/x [--json]  wall time, productive training time and badput by cause
  hf import <hf_dir> --workdir w / hf export --workdir w --out dir  Hugging Face checkpoints
  tokenizer train --files '<glob>' --vocab_size N --out tok.json  a byte-level BPE, offline
  tokenize --tokenizer tok.json --files '<glob>' --out dir  a corpus -> memory-mapped token files

JAX is imported only after `--cpu_devices` has been applied, which must precede backend start-up.
Bad input (`UserError`) prints one line on stderr and exits with its code (see infra/errors.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from infra import process
from infra.errors import Preempted, UserError


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.k=v` / `--config.k v` overrides from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                overrides.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infra", description="JAX training stack")
    p.add_argument("--cpu_devices", type=int, default=None,
                   help="emulate N CPU devices (also: INFRA_CPU_DEVICES=N)")
    p.add_argument("--compile_cache", default=None, metavar="DIR|off",
                   help="JAX's persistent compilation cache for train, eval, generate and serve "
                        "(also: INFRA_COMPILE_CACHE; default ~/.cache/infra/jax)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment (resumes if the workdir has a checkpoint)")
    t.add_argument("--config", required=True, help="experiments/<name>.py[:variant]")
    t.add_argument("--workdir", required=True, help="where checkpoints, metrics and config.json go")
    t.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    sub.add_parser("list", help="print every experiment and its variants")

    s = sub.add_parser("smoke", help="run the smoke variant of every (or each named) experiment")
    s.add_argument("experiments", nargs="*", help="experiment files (default: all)")
    s.add_argument("--cpu_devices", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    from infra import plan  # imports no JAX: devices are emulated before JAX starts

    pl = sub.add_parser("plan", help="per-device memory, FLOPs, collectives, step time and cost "
                                     "of a config on N chips (nothing is allocated)")
    plan.add_arguments(pl)

    from infra import evaluate, generate, plot  # import no JAX at module level either

    po = sub.add_parser("plot", help="loss vs step and vs tokens seen of one or more runs, as a PNG")
    plot.add_arguments(po)

    g = sub.add_parser("generate", help="sample text from the latest checkpoint of an LM run")
    generate.add_arguments(g)

    from infra.serve import cli as serve_cli  # imports neither JAX nor the web stack

    sv = sub.add_parser("serve", help="serve an LM run over an OpenAI-compatible HTTP API "
                                      "(continuous batching, KV cache)")
    serve_cli.add_arguments(sv)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on its held-out data (one JSON line)")
    evaluate.add_arguments(e)

    from infra import goodput

    gp = sub.add_parser("goodput", help="of a workdir's wall time, how much trained the model")
    goodput.add_arguments(gp)

    from infra.data import tokenizer_cli
    from infra.interop import cli as hf_cli

    for cached in (t, s, g, sv, e):  # also accepted after the command, where users put it
        cached.add_argument("--compile_cache", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    h = sub.add_parser("hf", help="import / export Hugging Face Llama-family checkpoints")
    hf_cli.add_arguments(h)
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on local text")
    tokenizer_cli.add_train_arguments(tk)
    tz = sub.add_parser("tokenize", help="tokenise a corpus once into memory-mapped token files")
    tokenizer_cli.add_tokenize_arguments(tz)
    return p


def _setup_devices(cpu_devices: int | None) -> None:
    from infra import mesh

    if cpu_devices is not None:
        if cpu_devices < 1:
            raise UserError(f"--cpu_devices must be >= 1, got {cpu_devices}; pass e.g. --cpu_devices 8 or leave it out")
        mesh.emulate_cpu_devices(cpu_devices)
    else:
        mesh.emulate_from_env()


def cmd_train(args, overrides: list[str]) -> int:
    from infra import config, train

    from infra.tasks import get_task_class

    cfg = config.load(args.config, overrides)
    _, history = train.run(cfg, args.workdir)
    if not train.is_main_process():
        return 0
    for name in get_task_class(cfg.task).headline_metrics:  # e.g. "eval loss 5.96 (step 0) -> ..."
        evals = [r for r in history if f"eval/{name}" in r]
        if evals:
            fmt = lambda r: f"{r[f'eval/{name}']:.4f}" if r[f"eval/{name}"] is not None else "non-finite"  # noqa: E731,B023
            print(f"eval {name} {fmt(evals[0])} (step {evals[0]['step']}) -> "
                  f"{fmt(evals[-1])} (step {evals[-1]['step']})")
    return 0


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def parameter_count(spec: str) -> int | None:
    """The parameters of an experiment variant's model, from its config (None when the model
    does not declare a count, or the variant needs settings it lacks, e.g. `init.from`)."""
    from infra import config
    from infra.models import hyper_params

    try:
        return getattr(hyper_params(config.load(spec).model), "num_params", None)
    except UserError:
        return None


def cmd_list() -> int:
    from infra import config

    for name, doc, variants in config.describe_experiments():
        print(f"{name}: {doc}")
        for variant, desc in variants.items():
            count = parameter_count(f"{name}:{variant}")
            size = f" [{_human(count)} parameters]" if count else ""
            print(f"  {name}:{variant:<8} {desc}{size}")
    return 0


def run_smoke(experiments: list[str]) -> list[dict]:
    """Train each experiment's `smoke` variant in a temporary workdir; one result row each."""
    from infra import config, train
    from infra.tasks import get_task_class

    names = experiments or [str(p) for p in config.list_experiment_files()]
    rows = []
    for name in names:
        start = time.perf_counter()
        row = {"experiment": name, "ok": False, "detail": ""}
        try:
            cfg = config.load(f"{name}:smoke", {"train.progress_bar": False, "sharding.print_table": False})
            with tempfile.TemporaryDirectory(prefix="infra-smoke-") as workdir:
                state, history = train.run(cfg, workdir)
            losses = [r["train/loss"] for r in history if "train/loss" in r]
            finite = bool(losses) and all(v is not None for v in losses)
            row["ok"] = finite and int(state["step"]) == cfg.train.steps
            row["detail"] = (f"{cfg.train.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                             if finite else "non-finite or missing loss")
            evals = [r for r in history if any(k.startswith("eval/") for k in r)]
            for name in get_task_class(cfg.task).headline_metrics if evals else ():
                if evals[-1].get(f"eval/{name}") is not None:
                    row["detail"] += f", eval {name} {evals[-1][f'eval/{name}']:.4g}"
        except Exception as e:  # a smoke test reports every failure in its table
            row["detail"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
    return rows


def cmd_smoke(args) -> int:
    rows = run_smoke(args.experiments)
    width = max(len(r["experiment"]) for r in rows)
    print(f"{'experiment':<{width}}  result  seconds  detail")
    for r in rows:
        print(f"{r['experiment']:<{width}}  {'PASS' if r['ok'] else 'FAIL':<6}  {r['seconds']:7.1f}  {r['detail']}")
    return 0 if all(r["ok"] for r in rows) else 1


def _say_last(line: str) -> None:
    """Print the line a failed or stopped run ends with; in a multi-process run also silence
    the runtime's threads after it (see `process.say_last`)."""
    mesh = sys.modules.get("infra.mesh")
    if mesh is None or not mesh.distributed_started:
        print(line, file=sys.stderr, flush=True)
    else:
        process.say_last(line)


def main(argv: list[str] | None = None) -> int:
    process.setup(cli=True)  # first: the malloc settings must precede JAX's threads
    process.catch_sigterm()  # from now on SIGTERM only asks the run to stop: never a kill
    process.catch_sigint()
    try:
        return _run(argv)
    except UserError as e:
        _say_last(f"error: {e.cli_message()}")
        return e.exit_code
    except Preempted as e:
        _say_last(f"preempted: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        if not process.interrupted():
            raise
        # a Ctrl-C that landed in an extension's import (JAX's, at start-up) comes back as an
        # ImportError "while initializing the extension": it is still the user's Ctrl-C
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def _run(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command not in ("train", "plan", "hf"):
        raise UserError(f"--config.* overrides apply to `train`, `plan` and `hf import` "
                        f"only, not `{args.command}`")
    cpu_devices = args.cpu_devices
    if args.command == "plan":
        cpu_devices = args.devices  # plan emulates the chips it plans for
    if args.command == "smoke" and cpu_devices is None:
        cpu_devices = int(os.environ.get("INFRA_CPU_DEVICES", 8))
    if args.command not in ("list", "plot", "goodput", "tokenizer", "tokenize"):
        process.import_jax()  # a Ctrl-C during JAX's own import would abort the process
    _setup_devices(cpu_devices)
    if args.command in ("train", "smoke", "eval", "generate", "serve"):
        from infra import compile_cache  # a second start loads what the first compiled

        compile_cache.enable(args.compile_cache)
    if args.command == "train":
        return cmd_train(args, overrides)
    if args.command == "plan":
        from infra import plan

        return plan.run_cli(args, overrides)
    if args.command == "list":
        return cmd_list()
    if args.command == "plot":
        from infra import plot

        return plot.run_cli(args)
    if args.command == "generate":
        from infra import generate

        return generate.run_cli(args)
    if args.command == "serve":
        from infra.serve import cli as serve_cli

        return serve_cli.run_cli(args)
    if args.command == "eval":
        from infra import evaluate

        return evaluate.run_cli(args)
    if args.command == "goodput":
        from infra import goodput

        return goodput.run_cli(args)
    if args.command == "hf":
        from infra.interop import cli as hf_cli

        return hf_cli.run_cli(args, overrides)
    if args.command == "tokenizer":
        from infra.data import tokenizer_cli

        return tokenizer_cli.run_train_cli(args)
    if args.command == "tokenize":
        from infra.data import tokenizer_cli

        return tokenizer_cli.run_tokenize_cli(args)
    return cmd_smoke(args)


def run_and_exit() -> None:
    """The process entry point (`python -m infra`, the `infra` script): `main`, then exit
    without the interpreter's teardown. A signal can stop the main thread while JAX's or grain's
    threads are mid-work, and tearing the interpreter down under them can crash (a segfault
    instead of the exit code); everything of ours is closed by then."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # What JAX's own exit hook would do, after a clean end (after a failure the peers may be
    # gone, and the runtime would log its own errors after our one line). Only where JAX surely
    # finished importing: an interrupt may have stopped an import half-way, and importing it
    # again would abort the process.
    mesh = sys.modules.get("infra.mesh")
    if code in (0, Preempted.exit_code) and mesh is not None and mesh.distributed_started:
        import jax

        jax.distributed.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
