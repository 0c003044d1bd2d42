# `fast` at its own 500 iterations in the `diode experiment --profile full` setting (row fast@500).
from pathlib import Path
from diode.experiment import Experiment

exp = Experiment(Path("runs/experiment-full"), "full")
for seed in exp.profile.seeds:
    print("RESULT", exp.run_row("fast@500", seed), flush=True)
