"""`megasft plan`: the memory per GPU of a training run, by part, before it starts.

`megasft.plan.cli.plan_run(config, architecture, seq_length)` gives a `MemoryPlan`
(`megasft.plan.memory`); `megasft.plan.report` prints it. See docs/plan.md.
"""
