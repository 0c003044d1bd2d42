"""Datasets: COCO and YOLO readers/writers and the letterboxed `DetectionDataset` they produce."""

from diode.data.coco import read_coco, write_coco
from diode.data.dataset import (
    DetectionDataset,
    Record,
    letterbox,
    letterbox_boxes,
    open_dataset,
)
from diode.data.yolo import read_yolo, write_data_yaml, write_yolo_labels

__all__ = [
    "DetectionDataset",
    "Record",
    "letterbox",
    "letterbox_boxes",
    "open_dataset",
    "read_coco",
    "write_coco",
    "read_yolo",
    "write_yolo_labels",
    "write_data_yaml",
]
