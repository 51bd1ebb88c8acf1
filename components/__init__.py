"""The pipeline's KFP components: one file per component, each a typed signature and one call into megasft."""
