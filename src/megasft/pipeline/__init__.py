"""The Kubeflow pipeline around the stages: run configurations, the steps the components call, compile, run-local and submit."""
