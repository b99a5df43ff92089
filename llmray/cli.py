"""The ``llmray`` command: one subcommand per stage that exists, plus ``pipeline``.

Every stage subcommand takes the same shape::

    llmray <stage> --config configs/<kind>/<name>.yaml [key.path=value ...] [--run NAME] [--force]

and ``llmray <stage> --help`` lists every config key with its type, default and meaning.
``jobs/<stage>.py`` calls :func:`main` with the stage name, so ``ray job submit`` runs the very
same code path.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llmray import config as config_lib
from llmray import stages as stages_lib

DEFAULT_RUNS_DIR = "runs"

# Commands that are not pipeline stages (they make no run directory), e.g. generate or chat.
# Each maps to "module:add_parser"; add_parser(subparsers) adds its parser and sets
# `handler=fn(args) -> int` with parser.set_defaults. Imported lazily, like the stages.
TOOLS: dict[str, str] = {
    "generate": "llmray.model.generate_cli:add_generate_parser",
    "chat": "llmray.model.generate_cli:add_chat_parser",
    "report": "llmray.report:add_parser",
    "serve": "llmray.serve.cli:add_parser",
    "plan": "llmray.train.memory_plan:add_parser",
}


def _runs_dir(text: str) -> Path | str:
    """A URI stays a URI (``Path`` would make ``s3://b`` a local ``s3:/b`` folder); a local path is
    made absolute, because Ray workers run in other directories."""
    from llmray import storage

    return storage.normalize(text) if storage.is_remote(text) else Path(text).resolve()


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", type=Path, help="YAML config file (keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="override any config key, e.g. optim.lr=3e-4")
    parser.add_argument("--run", default=None,
                        help="run name: outputs go to <runs-dir>/<run>/<stage>/ (default: the config "
                             "file's name)")
    parser.add_argument("--runs-dir", default=os.environ.get("LLMRAY_RUNS_DIR", DEFAULT_RUNS_DIR),
                        type=_runs_dir,
                        help="root of run directories: a local path or an object-store URI such as "
                             "s3://bucket/runs (env LLMRAY_RUNS_DIR; default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="run even if inputs and config are unchanged since the last complete run")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of an embedded local Ray")
    parser.add_argument("--mlflow-uri", default=os.environ.get("LLMRAY_MLFLOW_URI"),
                        help="record each stage as an MLflow run at this tracking URI (env LLMRAY_MLFLOW_URI; "
                             "a pipeline config's tracking section otherwise)")
    parser.add_argument("--mlflow-experiment", default="llmray", help="MLflow experiment (default: %(default)s)")


def _config_epilog(cls: type) -> str:
    rows = config_lib.describe(cls)
    width = max((len(key) for key, _, _ in rows), default=0)
    lines = ["config keys (YAML or key.path=value overrides):"]
    lines += [f"  {key:<{width}}  {kind}\n  {'':<{width}}  {doc}" for key, kind, doc in rows]
    return "\n".join(lines)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser. Only ``command``'s config class is imported (for its ``--help`` key list),
    so ``llmray --help`` and every other command start without importing each stage's libraries."""
    parser = argparse.ArgumentParser(
        prog="llmray",
        description="Build a language model from raw text on Ray: curate, tokenize, pretrain, "
                    "align, evaluate, report. Runs on an embedded local Ray or any Ray cluster.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for stage in stages_lib.STAGES.values():
        holder = sub
        if stage.verb:
            holder = sub.add_parser(stage.name, help=stage.summary).add_subparsers(
                dest="verb", metavar="<verb>", required=True)
        stage_parser = holder.add_parser(
            stage.verb or stage.name, help=stage.summary, description=stage.summary,
            epilog=_config_epilog(stage.config_cls) if stage.name == command else None,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(stage_parser)
        stage_parser.set_defaults(stage=stage.name)
    for add_parser in TOOLS.values():
        stages_lib.resolve(add_parser)(sub)
    from llmray.pipeline import PipelineConfig

    pipe = sub.add_parser(
        "pipeline", help="run every configured stage in order, skipping those whose lineage is unchanged",
        description="Run the stages listed in a pipeline config in order; a stage whose inputs and "
                    "resolved config are unchanged since its last complete run is skipped.",
        epilog=_config_epilog(PipelineConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(pipe)
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LLMRAY_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    _setup_logging()
    from llmray import pipeline

    try:
        if args.command == "pipeline":
            pipeline.run_pipeline_command(args)
        elif getattr(args, "stage", None):
            pipeline.run_stage_command(stages_lib.STAGES[args.stage], args)
        else:
            return args.handler(args)
    except config_lib.ConfigError as exc:
        print(f"llmray {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
