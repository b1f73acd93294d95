"""Training data at any size: prompt sources and real-image sources behind two small protocols.

    prompts   open_prompt_source(spec, captions_of)   a text file, "captions" (of the real images), a plug-in
    images    open_image_source(spec) -> ImageSource  image folder (+ metadata.jsonl captions), a save_to_disk
                                                      dataset, WebDataset .tar shards, a plug-in
    stream    RealImageStream(source, R, B, ...)      (B, 3, R, R) in [-1, 1]: resize + crop in DataLoader workers,
                                                      sharded over processes, resumable by one position counter

Bottom layer: imports nothing of flashdmd but the error type and the plug-in registry.
"""
from flashdmd.data.images import load_image, to_training_tensor
from flashdmd.data.prompts import (MAX_PROMPT_CHARS, ListPromptSource, PromptSource, open_prompt_source,
                                   read_prompt_file)
from flashdmd.data.shards import WebDatasetSource
from flashdmd.data.sources import HFDiskSource, ImageFolderSource, ImageSource, open_image_source
from flashdmd.data.stream import RealImageStream

__all__ = [
    "MAX_PROMPT_CHARS", "read_prompt_file", "PromptSource", "ListPromptSource", "open_prompt_source",
    "ImageSource", "ImageFolderSource", "HFDiskSource", "WebDatasetSource", "open_image_source",
    "load_image", "to_training_tensor", "RealImageStream",
]
