"""COCO mAP evaluation of detectors (pycocotools underneath)."""

from diode.evaluation.coco_eval import evaluate_detections, evaluate_detector, format_table

__all__ = ["evaluate_detections", "evaluate_detector", "format_table"]
