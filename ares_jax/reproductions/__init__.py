"""Reproductions on the built-in task: the entropy-difficulty law over seeds (`law`), the AEPO ablation
(`ablation`) and the long run of its variants (`long_run`). Each runs the `ares_jax.main` stages as
subprocesses, one workdir per run (a killed driver resumes: finished runs are read back, unfinished ones resume
from their checkpoints), and writes a JSON summary, a markdown table and a plot."""
