# The `fast` row of `diode experiment --profile full` with earlier `fast` recipes (same images,
# iterations, seeds and KD budget), to see what the session-4 box sizes did to the student.
import sys
from dataclasses import replace
from pathlib import Path
from diode.experiment import PROFILES, Experiment

exp = Experiment(Path("runs/experiment-full60"), "full-60", profile=replace(PROFILES["full"], kd_epochs=60))
for name in sys.argv[1:] or ("fast-session3", "fast-session2"):
    images, seconds, agreement = exp.synthesize_transfer(name, str(Path(__file__).with_name(f"{name}.yaml")), {}, exp.profile.fast_iterations,
                                                         seed=4000, count=exp.profile.transfer_images)
    for seed in exp.profile.seeds:
        m = exp.distil_student(f"{name}__n192__seed{seed}", images, seed)
        print("RESULT", name, seed, m["map_50"], m["map"], seconds, agreement, flush=True)
