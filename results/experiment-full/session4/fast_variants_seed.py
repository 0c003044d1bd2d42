# Like fast_variants.py with another synthesis seed: args RECIPE_NAME SYNTH_SEED (recipe `fast` =
# the bundled one); the synthetic set goes to synthetic/<name>-s<seed>.
import sys
from dataclasses import replace
from pathlib import Path
from diode.experiment import PROFILES, Experiment

name, synth_seed = sys.argv[1], int(sys.argv[2])
recipe = name if name == "fast" else str(Path(__file__).with_name(f"{name}.yaml"))
exp = Experiment(Path("runs/experiment-full60"), "full-60", profile=replace(PROFILES["full"], kd_epochs=60))
tag = f"{name}-s{synth_seed}"
images, seconds, agreement = exp.synthesize_transfer(tag, recipe, {}, exp.profile.fast_iterations,
                                                     seed=synth_seed, count=exp.profile.transfer_images)
for seed in exp.profile.seeds:
    m = exp.distil_student(f"{tag}__n192__seed{seed}", images, seed)
    print("RESULT", tag, seed, m["map_50"], m["map"], seconds, agreement, flush=True)
