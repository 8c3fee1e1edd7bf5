"""python -m instructgpt_jax.bench {attention,train,decode,ppo,all} [--json out.json] [--max-seq N] [--repeats R]

Each benchmark is a module `instructgpt_jax/bench/<name>.py` exposing
  add_arguments(parser)      optional: its own flags, on top of the common ones below;
  run(args) -> list[dict]    measures, prints its table, returns the rows (JSON-ready).
To add one, write the module and list its name in BENCHMARKS.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from instructgpt_jax.errors import UserError, report

BENCHMARKS = ("attention", "train", "decode", "ppo")


def _common_flags() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", default=None, help="write the rows (and the environment) to this file")
    parent.add_argument("--max-seq", type=int, default=8192, help="largest sequence length to run")
    parent.add_argument("--repeats", type=int, default=5, help="timed calls per figure (median reported)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m instructgpt_jax.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    parent = _common_flags()
    for name in BENCHMARKS:
        module = importlib.import_module(f"instructgpt_jax.bench.{name}")
        p = sub.add_parser(name, parents=[parent], help=(module.__doc__ or "").strip().split("\n")[0])
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
    sub.add_parser("all", parents=[parent], help="every benchmark with its default flags")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(parser, args)
    except UserError as e:  # an impossible shape or setting: one line, no traceback
        return report(e)


def run(parser, args) -> int:
    from instructgpt_jax.bench import common  # imports JAX: only after host_memory's re-execution (below)

    if args.benchmark != "all":
        rows = importlib.import_module(f"instructgpt_jax.bench.{args.benchmark}").run(args)
        if args.json:
            common.write_json(args.json, args.benchmark, rows)
        return 0
    shared = ["--max-seq", str(args.max_seq), "--repeats", str(args.repeats)]
    results = {}
    for name in BENCHMARKS:
        module_args = parser.parse_args([name, *shared])
        results[name] = importlib.import_module(f"instructgpt_jax.bench.{name}").run(module_args)
    if args.json:
        common.write_json(args.json, "all", [], extra={"results": results})
    return 0


if __name__ == "__main__":
    from instructgpt_jax import host_memory

    host_memory.keep_scratch_memory_mapped()
    sys.exit(main())
