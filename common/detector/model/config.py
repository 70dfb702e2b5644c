"""Typed configuration of the lesion detector (YAML -> frozen dataclasses).

Load with ``common.config.load_config(path, ModelConfig)`` or build in code;
``__post_init__`` validates values that the generic loader cannot (the error
names the field and the bad value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import bounded, path_field
from common.keys import CLASSES
from common.wire.federation import PersonalizationConfig


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the detector exactly.

    :attr:`input_channels` is how many channels an input image has.

    Attributes:
        arch: registry name (``tiny``, ``small``, ``medium``, ``resnet18``,
            ``resnet34``, ``resnet50`` or a user-registered one); checked when
            the model is built (:func:`common.detector.model.build_detector`
            lists the valid names).
        norm: normalization of the backbone: ``batch`` (BatchNorm, FedBN-capable)
            or ``group`` (GroupNorm, required by Opacus DP-SGD). The FCOS head
            always uses GroupNorm, as in the FCOS paper.
        fpn_channels: channels of every FPN level and of the head convs.
        head_convs: conv+norm+ReLU blocks in each head branch (torchvision's
            default is 4; 2 is about four times cheaper on CPU).
        score_thresh: score floor for detections in eval mode; FROC needs a low
            floor so the whole curve can be swept.
        detections_per_img: most detections kept per image after NMS.
        nms_thresh: IoU threshold of per-class NMS.
        topk_candidates: candidates per FPN level before NMS.
        center_sampling_radius: FCOS centre sampling radius (in strides).
        image_mean, image_std: normalization of every input channel; images
            arrive in ``[0, 1]``.
        working_spacing_mm: mm per model-space pixel the model was built for
            (recorded in checkpoints; the model itself never resizes).
        speck_channel: feed the backbone a second channel, the image's white
            top-hat (``fcos.SpeckEnhance``: calcification specks without the
            tissue behind them); changes ``conv1``'s shape.
        contralateral: every image arrives with a second channel, the same
            woman's other breast of the same view resized onto its grid
            (``common.imaging.data.SiteDataset(contralateral=True)``; zeros
            when she has none), so the detector can read an asymmetry;
            changes ``conv1``'s shape. Training and evaluation on caches only:
            ``predict`` and the ONNX export refuse such a model.
        tta_flip: in eval mode, also detect the up-down mirror and fuse
            (``MammoFCOS.forward``); inference only, twice the time.
        breast_mask: in eval mode, drop detections whose box centre lies
            outside the breast (``common.imaging.preprocess.breast_mask`` of
            the input image: film labels, markers, the paddle's edge);
            inference only, a few milliseconds per image.
        speck_clusters: the calcification findings come from the clusters of
            specks found at the stored resolution
            (:func:`common.imaging.specks.with_speck_clusters`) instead of the
            network's cluster class; masses stay the network's. Inference
            only: ``evaluate`` needs a cache ingested with ``specks: true``,
            ``predict`` and the DICOM node find the specks as they read each
            file; ``crossval`` applies it to its out-of-fold images; the ONNX
            export refuses such a model. The evaluations inside training
            (``train``'s test metrics, a federated round's) report the
            network's own clusters.
        weights_path: optional LOCAL file with ResNet backbone weights (a
            torchvision ResNet ``state_dict``; a 3-channel ``conv1`` is summed to
            one channel). Never downloaded.
        num_classes: fixed to ``len(common.keys.CLASSES)``.
    """

    arch: str = "tiny"
    norm: Literal["batch", "group"] = "batch"
    fpn_channels: int = field(default=32, metadata=bounded(8, 1024))
    head_convs: int = field(default=2, metadata=bounded(0, 8))
    score_thresh: float = field(default=0.01, metadata=bounded(0.0, 1.0))
    detections_per_img: int = field(default=100, metadata=bounded(1, 10000))
    nms_thresh: float = field(default=0.6, metadata=bounded(0.0, 1.0))
    topk_candidates: int = field(default=1000, metadata=bounded(1, 100000))
    center_sampling_radius: float = field(default=1.5, metadata=bounded(0.0, 10.0))
    image_mean: float = 0.5
    image_std: float = field(default=0.25, metadata=bounded(1e-6, None))
    working_spacing_mm: float = field(default=0.4, metadata=bounded(1e-4, 10.0))
    speck_channel: bool = False
    contralateral: bool = False
    tta_flip: bool = False
    breast_mask: bool = False
    speck_clusters: bool = False
    weights_path: Path | None = field(default=None, metadata=path_field(True))
    num_classes: int = len(CLASSES)

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "group"):
            raise ValueError(f"norm: must be 'batch' or 'group', got {self.norm!r}")
        if self.num_classes != len(CLASSES):
            raise ValueError(
                f"num_classes: fixed to {len(CLASSES)} ({', '.join(CLASSES)}), "
                f"got {self.num_classes!r}"
            )
        if self.contralateral and self.weights_path is not None:
            raise ValueError(
                "contralateral: cannot be combined with weights_path (its "
                "conv1 takes one channel)"
            )
        if self.fpn_channels % 8 != 0:
            raise ValueError(
                f"fpn_channels: must be a multiple of 8, got {self.fpn_channels!r}"
            )

    @property
    def input_channels(self) -> int:
        """Channels of an input image: 1, or 2 with :attr:`contralateral`."""
        return 2 if self.contralateral else 1


#: Which state stays on the site: the federation config's own record, so a
#: run's ``personalization`` is passed as is (its keys:
#: :func:`common.detector.model.shared_and_personal` and ``head_keys``).
Personalization = PersonalizationConfig
