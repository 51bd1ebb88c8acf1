"""Where training runs: launchers picked by `launcher.kind` (`megasft.launch.registry`).

`local` trains in the step's process (torchrun); `pytorchjob` runs a Kubeflow PyTorchJob through
the Kubernetes job machinery that job kinds share (`job_*.py`, `cluster.py`). docs/train.md
("Launchers") says how to add one.
"""
