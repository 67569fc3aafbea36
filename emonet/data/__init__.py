"""The EMOTIC data: validated annotations and their boxes (:mod:`~emonet.data.annotations`), the arrays
(:mod:`~emonet.data.arrays`) and input images (:mod:`~emonet.data.images`), valence/arousal
normalization (:mod:`~emonet.data.normalize`), the demo archive (:mod:`~emonet.data.demo`), face
visibility (scored in :mod:`~emonet.data.face_visibility`, written as a split's column in
:mod:`~emonet.data.visibility_column`); and the only torch modules of this package: the ``Dataset``
(:mod:`~emonet.data.dataset`), the image presets (:mod:`~emonet.data.transforms`) and the one
DataLoader factory (:mod:`~emonet.data.loaders`).

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "annotations": [
            "BOX_FIT_TOLERANCE_PX",
            "DUPLICATES_ENV",
            "DUPLICATE_ACTIONS",
            "DUPLICATE_KEYS",
            "INVALID_AFFECT_ACTIONS",
            "LABEL_COLUMNS",
            "affect_targets",
            "find_duplicates",
            "load_annotations",
            "raw_affect",
            "scaled_box",
        ],
        "arrays": [
            "check_file_name",
            "load_array",
            "open_image_array",
        ],
        "dataset": [
            "EmoticDataset",
        ],
        "demo": [
            "DEMO_ROWS",
            "GLYPHS",
            "MANIFEST_NAME",
            "MIN_SIZE",
            "ensure_demo_archive",
            "example_crop",
            "make_demo_data",
        ],
        "face_visibility": [
            "FACE_LANDMARKER_ENV",
            "FACE_LANDMARKER_OPTIONS",
            "FACE_LANDMARKER_SHA256",
            "FACE_LANDMARKER_URL",
            "FaceVisibilityScorer",
            "MAX_CROP_PIXELS",
            "MAX_SCORED_SIDE",
            "chunk_size",
            "default_face_landmarker_path",
            "default_workers",
            "face_landmarker_path",
            "face_visibility_score",
            "score_crops",
            "score_names",
            "shutdown_pools",
            "thread_scorer",
        ],
        "images": [
            "DEFAULT_MAX_PIXELS",
            "DEFAULT_MAX_REQUEST_PIXELS",
            "DEFAULT_MAX_ROWS",
            "IMAGE_SUFFIXES",
            "ImageTooLargeError",
            "check_image",
            "check_max_pixels",
            "check_pixel_limit",
            "confined_image_size",
            "decode_image_b64",
            "image_b64_size",
            "image_file_size",
            "read_confined_image",
            "read_image",
            "resolve_image_root",
        ],
        "loaders": [
            "close_workers",
            "make_loader",
        ],
        "normalize": [
            "AffectNormalizer",
            "NormalizationResult",
            "PARAMS_FILENAME",
            "load_normalizer",
            "normalize_dataset",
            "normalize_frames",
            "write_normalized",
        ],
        "transforms": [
            "PairedTransform",
            "SingleTransform",
            "build_transforms",
        ],
        "visibility_column": [
            "VisibilityResult",
            "add_face_visibility",
            "write_visibility_csv",
        ],
    },
)
