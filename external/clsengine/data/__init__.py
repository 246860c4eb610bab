"""Datasets, image decoding, transforms and loaders."""
from .folder import FolderScan, ImageDataset, check_same_classes, list_images, scan_folder
from .image import UnreadableImageError, read_image
from .loader import EpochLoader
from .transforms import AugmentationConfig, build_deploy_transform, build_eval_transform, build_train_transform

__all__ = ["FolderScan", "ImageDataset", "check_same_classes", "list_images", "scan_folder", "UnreadableImageError",
           "read_image", "EpochLoader", "AugmentationConfig", "build_deploy_transform",
           "build_eval_transform", "build_train_transform"]
