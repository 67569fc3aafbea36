"""The network (:mod:`~emonet.models.network`), its encoders by name, torchvision's and
timm's (:mod:`~emonet.models.encoders`), the checkpoint file format
(:mod:`~emonet.models.checkpoint`), the ONNX export (:mod:`~emonet.models.onnx_export`) and the
device a model runs on (:mod:`~emonet.models.devices`).

The names below are re-exported lazily (``lazy_loader``): importing one submodule loads
only what it needs.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "checkpoint": [
            "BEST_CHECKPOINT",
            "CHECKPOINT_FORMAT",
            "CHECKPOINT_VERSION",
            "DiskSpaceError",
            "LAST_CHECKPOINT",
            "SERVING_CHECKPOINT",
            "check_free_space",
            "estimate_checkpoint_bytes",
            "load_checkpoint",
            "read_checkpoint",
            "remove_stale_temp_files",
            "save_checkpoint",
            "serving_checkpoint_of",
            "serving_part",
            "stored_config",
            "write_serving_checkpoint",
        ],
        "devices": [
            "resolve_device",
        ],
        "encoders": [
            "MissingWeightsError",
            "Preprocessing",
            "config_transforms",
            "create_encoder",
            "encoder_preprocessing",
            "freeze",
            "is_timm",
            "stream_preprocessing",
        ],
        "onnx_export": [
            "ONNX_FILE",
            "ONNX_INPUTS",
            "ONNX_OPSET",
            "ONNX_OUTPUTS",
            "export_onnx",
            "onnx_input_shapes",
            "onnx_metadata",
        ],
        "network": [
            "EMOTION_PRIOR",
            "EmoNet",
            "EmoNetOutput",
            "NUM_AFFECT",
            "VARIANTS",
            "build_model",
            "check_pretrained_weights",
            "create_trunk",
            "imagenet_state_dict",
            "load_trunk_weights",
        ],
    },
)
