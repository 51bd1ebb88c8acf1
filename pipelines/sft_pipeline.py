"""The SFT pipeline: wiring only; every step is a component that makes one call into megasft.

    validate ──► tokenize-and-mask ──┐
             └─► checkpoint-convert ─┴─► record-inputs
                 (hf -> megatron)    └─► train ──► export (megatron -> hf) ──► evaluate ──► register
                                                                              (gate passed only)
    finish: the exit handler, whatever happened (MLflow parent run status, webhook)

Caching: tokenize-and-mask and the hf -> megatron conversion are deterministic, and their cache
keys carry the content hashes of the data and the base model (from validate), so new content
at the same path is never served from the cache. Everything else runs every time.
Retries: the steps that can fail for a transient reason (a node lost, storage hiccups, the
tracking server); a retried train step resumes from its newest checkpoint.
"""

from kfp import dsl, kubernetes

from megasft._components.checkpoint_convert import checkpoint_convert
from megasft._components.evaluate import evaluate as evaluate_component
from megasft._components.finish import finish
from megasft._components.record_inputs import record_inputs
from megasft._components.register import register
from megasft._components.tokenize_and_mask import tokenize_and_mask
from megasft._components.train import train as train_component
from megasft._components.validate import validate
from megasft.pipeline.steps import PIPELINE_NAME

# The claims from manifests/base/storage.yaml, mounted where the training pods mount them (the
# PyTorchJob template; the TrainJob's runtime patch, megasft.launch.trainjob.CLAIMS), so a path
# means the same thing in a pipeline step and in a training pod. kfp.local ignores them.
DATA_CLAIM = ("megasft-data", "/data")
CHECKPOINT_CLAIM = ("megasft-checkpoints", "/checkpoints")


def _mount(task: dsl.PipelineTask, *claims: tuple[str, str]) -> dsl.PipelineTask:
    for claim, mount_path in claims:
        kubernetes.mount_pvc(task, pvc_name=claim, mount_path=mount_path)
    return task


def _retry(task: dsl.PipelineTask, attempts: int) -> dsl.PipelineTask:
    task.set_retry(num_retries=attempts, backoff_duration="30s", backoff_factor=2.0)
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Supervised fine-tuning with megatron-core: tokenize-and-mask, convert, train, "
    "export, evaluate tuned vs base, register when the gate passes.",
)
def sft_pipeline(
    config_name: str,
    data: dict,
    model: dict,
    train: dict = {},  # noqa: B006 - KFP parameter defaults are values in the compiled YAML
    launcher: dict = {"kind": "local"},  # noqa: B006
    evaluate: dict = {},  # noqa: B006
    tracking: dict = {},  # noqa: B006
    notify: dict = {},  # noqa: B006
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    final = finish(config_name=config_name, tracking=tracking, notify=notify, kfp_run_id=run_id)
    final.set_caching_options(False)
    with dsl.ExitHandler(final, name="sft"):
        checked = validate(
            config_name=config_name,
            data=data,
            model=model,
            train=train,
            launcher=launcher,
            evaluate=evaluate,
            tracking=tracking,
            notify=notify,
            kfp_run_id=run_id,
        ).set_caching_options(False)
        _mount(checked, DATA_CLAIM)
        parent_run_id = checked.outputs["parent_run_id"]

        prepared = tokenize_and_mask(
            data=data, model=model, data_digest=checked.outputs["data_digest"]
        ).set_caching_options(True)
        _retry(_mount(prepared, DATA_CLAIM), 2)

        base = checkpoint_convert(
            direction="hf-to-megatron",
            source_path=checked.outputs["base_model_path"],
            content_digest=checked.outputs["model_digest"],
        ).set_caching_options(True)
        base.set_display_name("checkpoint-convert (hf -> megatron)")
        _retry(_mount(base, DATA_CLAIM), 2)

        recorded = record_inputs(
            tracking=tracking,
            parent_run_id=parent_run_id,
            data_path=checked.outputs["data_path"],
            data_digest=checked.outputs["data_digest"],
            model_path=checked.outputs["base_model_path"],
            model_digest=checked.outputs["model_digest"],
            dataset=prepared.outputs["dataset"],
            base_checkpoint=base.outputs["output"],
        ).set_caching_options(False)
        _retry(recorded, 2)

        trained = train_component(
            config_name=config_name,
            train=train,
            launcher=launcher,
            tracking=tracking,
            kfp_run_id=run_id,
            parent_run_id=parent_run_id,
            dataset=prepared.outputs["dataset"],
            base_checkpoint=base.outputs["output"],
        ).set_caching_options(False)
        _retry(_mount(trained, DATA_CLAIM, CHECKPOINT_CLAIM), 2)
        # A cluster launcher makes this pod the job's owner (deleting the run deletes the job)
        # and runs the job in this pod's namespace.
        for variable, field_path in (
            ("POD_NAME", "metadata.name"),
            ("POD_UID", "metadata.uid"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ):
            kubernetes.use_field_path_as_env(trained, env_name=variable, field_path=field_path)

        exported = checkpoint_convert(
            direction="megatron-to-hf",
            source=trained.outputs["checkpoints"],
            base_path=checked.outputs["base_model_path"],
            tracking=tracking,
            parent_run_id=parent_run_id,
        ).set_caching_options(False)
        exported.set_display_name("export (megatron -> hf)")
        _retry(_mount(exported, DATA_CLAIM), 2)

        evaluated = evaluate_component(
            evaluate=evaluate,
            model=model,
            tracking=tracking,
            parent_run_id=parent_run_id,
            tuned=exported.outputs["output"],
            dataset=prepared.outputs["dataset"],
            checkpoints=trained.outputs["checkpoints"],
        ).set_caching_options(False)
        _retry(_mount(evaluated, DATA_CLAIM), 1)

        with dsl.If(evaluated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
            registered = register(
                config_name=config_name,
                tracking=tracking,
                parent_run_id=parent_run_id,
                tuned=exported.outputs["output"],
            ).set_caching_options(False)
            _retry(registered, 3)
