"""Datasets, image decoding, transforms and loaders."""
from .annotations import (FORMATS, dataset_format, read_category_map, read_class_names, scan_annotation_list, scan_coco,
                          scan_dataset)
from .balance import class_weights, sample_weights
from .folder import (DatasetScan, ImageDataset, check_same_classes, format_names, list_images, scan_folder,
                     select_classes)
from .image import UnreadableImageError, read_image
from .loader import EpochLoader, auto_workers
from .report import dataset_report, format_dataset_report
from .symmetry import MirrorAsymmetry, mirror_asymmetry
from .transforms import AugmentationConfig, build_batch_mix, build_deploy_transform, build_eval_transform, build_train_transform

__all__ = ["DatasetScan", "ImageDataset", "check_same_classes", "format_names", "list_images", "scan_folder", "select_classes",
           "UnreadableImageError", "read_image", "EpochLoader", "auto_workers", "AugmentationConfig", "build_batch_mix", "build_deploy_transform",
           "build_eval_transform", "build_train_transform", "read_category_map", "read_class_names",
           "scan_annotation_list", "scan_coco", "scan_dataset", "FORMATS", "dataset_format", "class_weights",
           "sample_weights",
           "dataset_report", "format_dataset_report", "MirrorAsymmetry", "mirror_asymmetry"]
