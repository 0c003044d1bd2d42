# `fast` at its own 500 iterations in the `diode experiment --profile full` setting (row fast@500).
from dataclasses import replace
from pathlib import Path
from diode.experiment import PROFILES, Experiment

exp = Experiment(Path("runs/experiment-full60"), "full-60", profile=replace(PROFILES["full"], kd_epochs=60))
for seed in exp.profile.seeds:
    print("RESULT", exp.run_row("fast@500", seed), flush=True)
