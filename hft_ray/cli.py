"""The `hft-ray` command line. Exit codes: 0 done, 1 failure at run time, 2 bad input."""

from __future__ import annotations

import argparse
import json
import sys

from hft_ray.errors import UserError
from hft_ray.selection import GRANULARITIES


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a ratio in (0, 1) such as 0.5") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hft-ray", description="Half Fine-Tuning of LLMs with Ray and MLflow.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    select = commands.add_parser("select", help="print the selection plan (which half is trained) for a model")
    select.add_argument("model", metavar="MODEL",
                        help="builtin:tiny-llama (and other built-ins), builtin:smollm2-135m, a model folder, "
                             "a .gguf file, or a cached Hugging Face id")
    select.add_argument("--granularity", default="category", help=f"one of {', '.join(GRANULARITIES)} (default: category)")
    select.add_argument("--ratio", type=_ratio, default=0.5, help="fraction trained, in (0, 1) (default: 0.5)")
    select.add_argument("--seed", type=int, default=0)
    select.add_argument("--stage", type=int, default=0, help="stage index: every stage draws a new plan")
    select.add_argument("--select-embeddings", action="store_true",
                        help="put embeddings, lm_head and the final norm under selection (default: trained)")
    select.add_argument("--json", action="store_true", help="print the plan as JSON")
    select.set_defaults(handler=run_select)
    return parser


def run_select(args: argparse.Namespace) -> int:
    from hft_ray.models import meta_model
    from hft_ray.selection import plan_units, model_units, validate_selection_args

    problems = validate_selection_args(args.granularity, args.ratio)
    try:
        model = meta_model(args.model)
    except UserError as error:
        problems += error.problems
    if problems:
        raise UserError(*problems)
    plan = plan_units(model_units(model), model.config.model_type, args.granularity, args.ratio,
                      args.seed, args.stage, args.select_embeddings)
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        from hft_ray.display import format_plan

        print(format_plan(plan, title=args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UserError as error:
        print("hft-ray: error:", file=sys.stderr)
        for problem in error.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
