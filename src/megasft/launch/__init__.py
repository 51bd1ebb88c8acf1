"""Where training runs: launchers picked by `launcher.kind` (`megasft.launch.registry`).

`local` trains in the step's process (torchrun); `pytorchjob` runs a Kubeflow PyTorchJob through
the shared Kubernetes job machinery (`job_*.py`, `cluster.py`). docs/architecture.md says how to
add one.
"""
