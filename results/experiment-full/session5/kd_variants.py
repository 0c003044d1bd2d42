# The real-kd and fast-multibox rows of `diode experiment --profile full` with another distillation
# setting (the same for both rows), to see which KD settings move the DIODE row relative to the
# real-image row. Args: TAG [epochs=N] [methods=soft=1,pseudo-label=1] [mosaic=P] [lr=X] [rows=a,b].
# Students go to runs/experiment-full/students/<row>-kd<TAG>__n192__seed<S> (resumable).
import sys
from dataclasses import replace
from pathlib import Path

from diode.config import AugmentConfig, TrainConfig
from diode.distill.losses import DistillConfig, parse_methods
from diode.experiment import PROFILES, Experiment
from diode.pipeline import train_student

tag, opts = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
exp = Experiment(Path("runs/experiment-full60"), "full-60", profile=replace(PROFILES["full"], kd_epochs=60))
p = exp.profile
epochs = int(opts.get("epochs", p.kd_epochs))
kd = DistillConfig(methods=parse_methods(opts["methods"])) if "methods" in opts else exp.kd
augment = AugmentConfig(mosaic_p=float(opts.get("mosaic", 0.0)))
(train_images, _), (val_images, val_targets) = exp._real()
for row in opts.get("rows", "real-kd,fast-multibox").split(","):
    if row == "real-kd":
        images = train_images[:p.transfer_images]
    else:
        images, _, _ = exp._transfer(row, p.transfer_images)
    for seed in p.seeds:
        cfg = TrainConfig(epochs=epochs, batch_size=p.kd_batch, seed=seed, eval_every=epochs,
                          checkpoint_every=max(1, epochs // 4), lr=float(opts.get("lr", 2e-3)), augment=augment)
        m = train_student(exp.teacher, exp.student_arch, images, None, val_images, val_targets, cfg,
                          exp.out / "students" / f"{row}-kd{tag}__n192__seed{seed}", kd=kd, progress=False,
                          command=" ".join(sys.argv))
        print("RESULT", tag, row, seed, round(m["map_50"], 4), round(m["map"], 4), flush=True)
