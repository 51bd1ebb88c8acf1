"""finish: the exit handler; records the run's final status in MLflow and posts the webhook."""

from kfp import dsl

from megasft._components._images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish(
    config_name: str,
    tracking: dict,
    notify: dict,
    kfp_run_id: str,
    status: dsl.PipelineTaskFinalStatus,
):
    """Runs last whatever happened: closes the MLflow parent run as FINISHED or FAILED and
    posts the final status to `notify.webhook` when one is set."""
    from megasft.pipeline import steps

    steps.finish(
        tracking,
        notify,
        config_name=config_name,
        kfp_run_id=kfp_run_id,
        state=status.state,
        error_message=status.error_message,
    )
