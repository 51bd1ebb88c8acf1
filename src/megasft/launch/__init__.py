"""Where training runs: local torchrun processes, or a Kubeflow PyTorchJob in a cluster."""
