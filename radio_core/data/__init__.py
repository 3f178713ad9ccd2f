"""Data: image sources, deterministic sampling, augmentation, tar shards, the teacher-feature cache.

``sources`` (random access to images) -> ``sampling`` (sample number -> image + augmentation
seed) -> ``augment`` (seeded crop + flip); ``shards`` stores sources as webdataset tars;
``shard_index`` holds their per-shard byte indexes and the global table of counts;
``cache`` stores teacher targets for fixed views.
"""
from .augment import AugmentedImages, collate, crop_params, loader_worker_init
from .sampling import SampleRef, SampleStream, StepBatchSampler, sampling_kwargs, view_seed
from .sources import IMAGE_EXTENSIONS, ImageFolderSource, ImageSource, SkimageSamplesSource, SyntheticSource, to_rgb

__all__ = ["AugmentedImages", "collate", "crop_params", "loader_worker_init", "SampleRef", "SampleStream",
           "StepBatchSampler", "sampling_kwargs", "view_seed", "IMAGE_EXTENSIONS", "ImageFolderSource",
           "ImageSource", "SkimageSamplesSource", "SyntheticSource", "to_rgb"]
