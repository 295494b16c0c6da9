"""Client library for the rle-serving gRPC server: ``SegmentationClient`` and mask helpers."""

from .client import Backoff, ClientError, SegmentationClient, result_document
from .masks import area, bbox, iou, to_mask, to_supervision

__all__ = ["Backoff", "ClientError", "SegmentationClient", "result_document", "area", "bbox",
           "iou", "to_mask", "to_supervision"]
