"""Supervised training of detectors (the teacher and the real-label reference student)."""
