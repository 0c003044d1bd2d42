"""Knowledge distillation of a student detector from a teacher on a transfer set (METHOD.md section 3)."""
