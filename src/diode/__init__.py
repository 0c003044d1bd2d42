"""diode: data-free knowledge distillation of object detectors (DIODE, WACV 2021)."""

__version__ = "0.1.0"
