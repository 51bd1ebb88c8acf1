"""`megasft pipeline compile | run-local | submit | render-job`: the Kubeflow pipeline from the
command line.

    megasft pipeline compile --output FILE.yaml
    megasft pipeline run-local [--config NAME|PATH] [--workdir DIR] [--set SECTION.KEY=VALUE ...]
    megasft pipeline submit --host URL [--config NAME|PATH] [--experiment NAME] [--wait]
    megasft pipeline render-job --config NAME|PATH [--set SECTION.KEY=VALUE ...] [--run-id ID]

A configuration is a name from pipelines/configs/ (`--config` lists them) or the path of a YAML
file in the same form (megasft.pipeline.config).
"""

from __future__ import annotations

import argparse
import sys


def add_pipeline_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline",
        help="compile, run locally or submit the Kubeflow SFT pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    compile_parser = actions.add_parser(
        "compile", help="write the pipeline's KFP YAML (IR) for `kfp run create` or the UI"
    )
    compile_parser.add_argument("--output", required=True, help="the YAML file to write")
    compile_parser.set_defaults(handler=_compile)

    local = actions.add_parser(
        "run-local",
        help="run the whole pipeline on this machine with kfp.local (training through torchrun)",
    )
    _add_config_arguments(local, default="demo")
    local.add_argument(
        "--workdir",
        default="pipeline-output",
        help="where the run's artifacts, logs and (for a sqlite tracking URI) MLflow store go "
        "(default: %(default)s)",
    )
    local.add_argument(
        "--quiet",
        action="store_true",
        help="print one line as each step starts and ends; each step's full output goes to "
        "WORKDIR/logs/STEP.log (default: stream everything the steps and kfp.local print)",
    )
    local.set_defaults(handler=_run_local)

    submit = actions.add_parser(
        "submit", help="upload the pipeline to Kubeflow Pipelines and start a run"
    )
    submit.add_argument(
        "--host", required=True, help="the KFP API endpoint, e.g. https://kfp.example.com/pipeline"
    )
    _add_config_arguments(submit, default="demo")
    submit.add_argument(
        "--experiment", default=None, help="KFP experiment (default: the config's name)"
    )
    submit.add_argument(
        "--wait", action="store_true", help="wait for the run; exit non-zero unless it succeeds"
    )
    submit.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="with --wait: give up after this many seconds (default: wait as long as it runs)",
    )
    submit.add_argument(
        "--run-name", default=None, help="the run's name (default: config and time)"
    )
    submit.add_argument(
        "--namespace", default=None, help="the Kubeflow profile namespace (multi-user installs)"
    )
    submit.set_defaults(handler=_submit)

    render = actions.add_parser(
        "render-job",
        help="print, as YAML, the training job (TrainJob or PyTorchJob) the train step would "
        "create, without a cluster",
    )
    _add_config_arguments(render, default=None)
    render.add_argument(
        "--run-id",
        default=None,
        help="the KFP run's id, which names the job and its workspace (default: all zeros)",
    )
    render.set_defaults(handler=_render_job)


def _shipped_configs() -> list[str]:
    """The names of the configurations shipped in pipelines/configs/."""
    from megasft.pipeline.config import config_directory

    return sorted(path.stem for path in config_directory().glob("*.yaml"))


def _add_config_arguments(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--config",
        default=default,
        required=default is None,
        help=f"a name from pipelines/configs/ ({', '.join(_shipped_configs())}) or a YAML path"
        + (" (default: %(default)s)" if default else ""),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.train_iters=100 (repeatable)",
    )


def _load(args: argparse.Namespace):
    from megasft.pipeline.config import load_pipeline_config

    return load_pipeline_config(args.config).with_overrides(args.overrides)


def _compile(args: argparse.Namespace) -> int:
    from megasft.pipeline.compile import compile_pipeline

    path = compile_pipeline(args.output)
    print(f"megasft pipeline: wrote {path}", file=sys.stderr)
    return 0


def _run_local(args: argparse.Namespace) -> int:
    from megasft.pipeline.local import run_local

    result = run_local(_load(args), workdir=args.workdir, quiet=args.quiet)
    return 0 if result.succeeded else 1


def _submit(args: argparse.Namespace) -> int:
    from megasft.pipeline.submit import submit_pipeline

    return submit_pipeline(
        _load(args),
        host=args.host,
        experiment=args.experiment,
        wait=args.wait,
        timeout_s=args.timeout,
        run_name=args.run_name,
        namespace=args.namespace,
    )


def _render_job(args: argparse.Namespace) -> int:
    import yaml

    from megasft.pipeline.render import EXAMPLE_RUN_ID, render_job

    job = render_job(_load(args), run_id=args.run_id or EXAMPLE_RUN_ID)
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False))
    print(
        f"megasft pipeline: the {job['kind']} of run {args.run_id or EXAMPLE_RUN_ID}; the train "
        "step adds its own pod as the owner",
        file=sys.stderr,
    )
    return 0
