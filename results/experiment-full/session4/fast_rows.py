# Runs the `fast` rows of `diode experiment --profile full` ahead of the others (same cache folder;
# the experiment command later finds them cached).
import sys
from dataclasses import replace
from pathlib import Path
from diode.experiment import PROFILES, Experiment

exp = Experiment(Path("runs/experiment-full60"), "full-60", profile=replace(PROFILES["full"], kd_epochs=60))
for seed in exp.profile.seeds:
    r = exp.run_row("fast", seed)
    print("RESULT", r, flush=True)
