# The fast-multibox row of `diode experiment --profile full` with recipe changes (same images, iterations,
# KD budget and seeds as the row): args NAME [SYNTH_SEED] [key=value ...] where a key is a dotted
# path into the recipe (`targets.boxes_per_image=[2,4]`, `stages.*.weights.bn=0.1`, `fp.enabled=false`;
# values are YAML). Synthetic set: runs/experiment-full/synthetic/<NAME>; students: students/<NAME>__n192__seed<S>.
import sys
from dataclasses import replace
from pathlib import Path

import yaml

from diode.allocator import keep_freed_memory
from diode.experiment import PROFILES, Experiment
from diode.io import atomic_write_text
from diode.synthesis.recipes import load_recipe

keep_freed_memory()
name, rest = sys.argv[1], sys.argv[2:]
synth_seed = int(rest.pop(0)) if rest and "=" not in rest[0] else 4000
raw = load_recipe("fast-multibox")


def assign(node, keys, value):
    if keys[0] == "*":
        for item in node:
            assign(item, keys[1:], value)
    elif len(keys) == 1:
        node[keys[0]] = value
    else:
        assign(node[int(keys[0])] if isinstance(node, list) else node.setdefault(keys[0], {}), keys[1:], value)


for item in rest:
    key, value = item.split("=", 1)
    assign(raw, key.split("."), yaml.safe_load(value))
recipe = Path("runs/experiment-full/recipes") / f"{name}.yaml"
recipe.parent.mkdir(parents=True, exist_ok=True)
atomic_write_text(recipe, f"# fast-multibox with {' '.join(rest) or 'no change'}\n" + yaml.safe_dump(raw, sort_keys=False))
exp = Experiment(Path("runs/experiment-full60"), "full-60", profile=replace(PROFILES["full"], kd_epochs=60))
images, seconds, agreement = exp.synthesize_transfer(name, str(recipe), {}, exp.profile.fast_iterations,
                                                     seed=synth_seed, count=exp.profile.transfer_images)
for seed in exp.profile.seeds:
    m = exp.distil_student(f"{name}__n192__seed{seed}", images, seed)
    print("RESULT", name, seed, round(m["map_50"], 4), round(m["map"], 4), round(seconds), agreement, flush=True)
