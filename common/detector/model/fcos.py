"""One-channel FCOS (anchor-free) on a ResNet + FPN backbone that never resizes.

Built from torchvision parts: :class:`MammoFCOS` is a
``torchvision.models.detection.FCOS`` whose transform only normalizes and pads
(:class:`NoResizeTransform`), whose head has a configurable number of convs
(:class:`ConfigurableFCOSHead`, torchvision's loss kept unchanged) and whose
backbone takes one input channel.

Tensor contract (model space = the working-spacing grid of the site cache):

* train mode: ``model(images, targets) -> dict[str, Tensor]`` of scalar losses
  (``classification``, ``bbox_regression``, ``bbox_ctrness``); ``images`` is a
  list of FloatTensor[1, H_i, W_i] in ``[0, 1]``; each target has ``boxes``
  FloatTensor[N, 4] ``[xmin, ymin, xmax, ymax]`` in model-space pixels and
  ``labels`` Int64Tensor[N] (index into ``common.keys.CLASSES``), optionally
  ``ignore`` FloatTensor[M, 4] (regions whose background locations take no
  classification loss). Other keys are ignored.
* eval mode: ``model(images) -> list[dict]`` with ``boxes`` FloatTensor[K, 4]
  in the same model-space pixels of the input image (clipped to ``0 <= x <= W``,
  ``0 <= y <= H``), ``scores`` FloatTensor[K] and ``labels`` Int64Tensor[K].
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import (
    FCOS,
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from common.detector.model.config import ModelConfig
from common.detector.model.registry import register_model
from common.detector.transforms import vflip_boxes
from common.errors import CheckpointMismatch
from common.imaging.preprocess import breast_mask, inside_mask

log = logging.getLogger(__name__)

NormFactory = Callable[[int], nn.Module]

#: Module types treated as normalization layers (FedBN keeps them personal).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
)


def norm_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of every normalization layer (params and buffers)."""
    keys: list[str] = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            keys.extend(prefix + k for k in mod.state_dict())
    return keys


def _groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` <= ``max_groups`` with >= 2 channels each.

    Two channels per group keep GroupNorm defined on a 1x1 map (P7 of a small
    image).
    """
    for g in range(min(max_groups, channels // 2), 0, -1):
        if channels % g == 0:
            return g
    return 1


def norm_factory(kind: str) -> NormFactory:
    """A ``channels -> nn.Module`` factory for ``"batch"`` or ``"group"`` norm.

    GroupNorm uses the largest divisor of ``channels`` up to 32 that leaves at
    least two channels per group, so narrow layers and 1x1 maps also work.
    """
    if kind == "batch":
        return nn.BatchNorm2d
    if kind == "group":
        return lambda c: nn.GroupNorm(_groups_for(c), c)
    raise ValueError(f"norm: must be 'batch' or 'group', got {kind!r}")


class NoResizeTransform(GeneralizedRCNNTransform):
    """Normalize and pad-batch only: images are already at the working spacing.

    torchvision's ``_skip_resize`` flag only skips resizing in training mode;
    this subclass never resizes, so boxes in and out stay in the input image's
    pixel grid. Batching pads on the right/bottom to a multiple of
    ``size_divisible`` (32), which moves no pixel.
    """

    def __init__(
        self,
        image_mean: float,
        image_std: float,
        size_divisible: int = 32,
        *,
        channels: int = 1,
    ) -> None:
        super().__init__(
            min_size=1,
            max_size=1,
            image_mean=[image_mean] * channels,
            image_std=[image_std] * channels,
            size_divisible=size_divisible,
        )

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Identity: returns ``image`` and ``target`` unchanged."""
        return image, target

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Identity: detections are already in input-image pixels."""
        return result


#: The logit an ignored location is given for the loss: its focal loss
#: against background is ``sigmoid(x)^gamma * log(1 + e^x)`` ~ 1e-39, i.e. 0.
_IGNORED_LOGIT = -30.0


def ignored_locations(
    anchors: Tensor, ignore: Tensor | None, matched: Tensor
) -> Tensor | None:
    """BoolTensor[L]: background locations whose centre lies in an ignore box.

    ``anchors`` FloatTensor[L, 4] (one image's FCOS locations, model space),
    ``ignore`` FloatTensor[M, 4] ``[xmin, ymin, xmax, ymax]`` in the same
    space (or ``None``), ``matched`` Int64Tensor[L] (the location's lesion
    box, ``< 0`` for background). A location assigned to a lesion stays a
    positive even inside an ignore box. ``None`` when nothing is ignored.
    """
    if ignore is None or ignore.numel() == 0:
        return None
    box = ignore.reshape(-1, 4).to(anchors)
    cx = ((anchors[:, 0] + anchors[:, 2]) / 2)[:, None]
    cy = ((anchors[:, 1] + anchors[:, 3]) / 2)[:, None]
    inside = (
        (cx >= box[:, 0]) & (cx <= box[:, 2]) & (cy >= box[:, 1]) & (cy <= box[:, 3])
    )
    return inside.any(dim=1) & (matched < 0)


class ConfigurableFCOSHead(FCOSHead):
    """torchvision's FCOS head with ``num_convs`` blocks per branch.

    Keeps :meth:`FCOSHead.compute_loss` (sigmoid focal + GIoU + centre-ness)
    and adds ignore regions: a target's ``ignore`` boxes (architectural
    distortions, asymmetries, a pseudo-labeller's unsure findings) take no
    classification loss at the background locations inside them
    (:func:`ignored_locations`), so the detector is taught neither that they
    are lesions nor that they are not. Until stop 51 they were background.
    Each branch block is Conv3x3 -> GroupNorm (32 groups at C >= 64) -> ReLU.
    """

    def __init__(
        self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int
    ) -> None:
        super().__init__(in_channels, num_anchors, num_classes, num_convs=0)
        norm = norm_factory("group")
        self.classification_head = FCOSClassificationHead(
            in_channels, num_anchors, num_classes, num_convs, norm_layer=norm
        )
        self.regression_head = FCOSRegressionHead(
            in_channels, num_anchors, num_convs, norm_layer=norm
        )

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """The FCOS loss of torchvision, ignored locations out of the focal term.

        An ignored location's logits are replaced (for the loss only, no
        gradient reaches them) by a constant whose focal loss is nil; the
        normalizer (the number of positives) is unchanged.
        """
        masks = [
            ignored_locations(a, t.get("ignore"), m)
            for a, t, m in zip(anchors, targets, matched_idxs, strict=True)
        ]
        if all(m is None for m in masks):
            return super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        cls = head_outputs["cls_logits"]
        drop = torch.stack(
            [
                torch.zeros(cls.shape[1], dtype=torch.bool, device=cls.device)
                if m is None
                else m.to(cls.device)
                for m in masks
            ]
        )
        masked = torch.where(drop[..., None], torch.full_like(cls, _IGNORED_LOGIT), cls)
        return super().compute_loss(
            targets, {**head_outputs, "cls_logits": masked}, anchors, matched_idxs
        )


class TinyResNet(nn.Module):
    """A very small ResNet-ish body for tests and CPU studies.

    Children follow torchvision's ResNet names (``conv1 bn1 relu maxpool
    layer1..layer4``) so the same FPN extractor applies; ``widths`` are the
    channels of ``conv1``/``layer1`` (stride 4) and of ``layer2``, ``layer3``,
    ``layer4`` (strides 8, 16, 32). ``depth`` BasicBlocks a stage: one block
    is the stage itself (``layer1.conv1``, the names of every ``tiny`` and
    ``small`` checkpoint), more are a ``Sequential`` as in torchvision's
    ResNet (``layer1.0.conv1``). Input FloatTensor[B, in_channels, H, W].
    """

    def __init__(
        self,
        norm_layer: NormFactory,
        widths: tuple[int, int, int, int],
        in_channels: int = 1,
        depth: int = 1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(
                f"TinyResNet depth must be >= 1 block a stage, got {depth}"
            )
        self.widths = w = widths
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_layer(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._stage(w[0], w[0], 1, norm_layer, depth)
        self.layer2 = self._stage(w[0], w[1], 2, norm_layer, depth)
        self.layer3 = self._stage(w[1], w[2], 2, norm_layer, depth)
        self.layer4 = self._stage(w[2], w[3], 2, norm_layer, depth)

    @staticmethod
    def _stage(
        cin: int, cout: int, stride: int, norm_layer: NormFactory, depth: int
    ) -> nn.Module:
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm_layer(cout)
            )
        first = tv_resnet.BasicBlock(
            cin, cout, stride=stride, downsample=down, norm_layer=norm_layer
        )
        if depth == 1:
            return first
        rest = (
            tv_resnet.BasicBlock(cout, cout, norm_layer=norm_layer)
            for _ in range(depth - 1)
        )
        return nn.Sequential(first, *rest)

    def forward(self, x: Tensor) -> Tensor:
        """Run the body (the FPN extractor uses intermediate outputs instead)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SpeckEnhance(nn.Module):
    """Adds a white top-hat channel of the image: ``[x, x0 - opening(x0)]``.

    The classic microcalcification enhancement of CAD: grey-level opening with
    a ``size`` x ``size`` square removes bright specks narrower than it, so
    ``x0 - opening(x0)`` keeps the specks and drops the tissue behind them
    (``x0``: the first channel, the image itself; a contralateral channel
    passes through). No parameters; max-pools only (exports to ONNX).
    FloatTensor[B, C, H, W] -> FloatTensor[B, C + 1, H, W].
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        if size < 3 or size % 2 == 0:
            raise ValueError(f"speck opening size must be odd and >= 3, got {size}")
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        """Stack the image and its white top-hat."""
        k, p = self.size, self.size // 2
        first = x[:, :1]
        eroded = -nn.functional.max_pool2d(-first, k, stride=1, padding=p)
        opened = nn.functional.max_pool2d(eroded, k, stride=1, padding=p)
        return torch.cat([x, first - opened], dim=1)


def speck_size(spacing_mm: float, speck_mm: float = 1.0) -> int:
    """Odd opening size (pixels, >= 3) wider than a ``speck_mm`` speck."""
    n = max(3, math.ceil(speck_mm / spacing_mm))
    return n if n % 2 else n + 1


def with_speck_channel(body: nn.Module, spacing_mm: float) -> nn.Module:
    """``body`` behind a :class:`SpeckEnhance` (its ``conv1`` takes one more channel).

    The children keep their names (``enhance`` first), so the FPN extractor
    and the state_dict keys of every other layer are unchanged.
    """
    conv = body.conv1
    assert isinstance(conv, nn.Conv2d)
    wide = nn.Conv2d(
        conv.in_channels + 1,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(wide.weight, mode="fan_out", nonlinearity="relu")
    out = nn.Module()
    out.add_module("enhance", SpeckEnhance(speck_size(spacing_mm)))
    for name, child in body.named_children():
        out.add_module(name, wide if name == "conv1" else child)
    out.widths = getattr(body, "widths", None)  # type: ignore[assignment]
    return out


def _resnet_body(
    depth: int, norm_layer: NormFactory, in_channels: int = 1
) -> tuple[nn.Module, list[int]]:
    builders: dict[int, Callable[..., tv_resnet.ResNet]] = {
        18: tv_resnet.resnet18,
        34: tv_resnet.resnet34,
        50: tv_resnet.resnet50,
    }
    body = builders[depth](weights=None, norm_layer=norm_layer)
    body.conv1 = nn.Conv2d(
        in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False
    )
    nn.init.kaiming_normal_(body.conv1.weight, mode="fan_out", nonlinearity="relu")
    expansion = 4 if depth >= 50 else 1
    return body, [128 * expansion, 256 * expansion, 512 * expansion]


def load_backbone_weights(body: nn.Module, path: Path) -> None:
    """Load a LOCAL torchvision-ResNet ``state_dict`` into ``body`` (one channel).

    A 3-channel ``conv1.weight`` is summed over its input channels. ``fc.*`` and
    keys absent from ``body`` are ignored; every body parameter must be present
    with the right shape, else :class:`CheckpointMismatch` names the key.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointMismatch(f"{p}: weights_path does not exist")
    raw: Any = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and "state_dict" in raw:
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise CheckpointMismatch(f"{p}: expected a state_dict, got {type(raw)}")
    state = {str(k).removeprefix("module."): v for k, v in raw.items()}
    w = state.get("conv1.weight")
    if isinstance(w, Tensor) and w.dim() == 4 and w.shape[1] == 3:
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    own = body.state_dict()
    for key, value in own.items():
        if key not in state:
            raise CheckpointMismatch(f"{p}: backbone key {key!r} missing")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointMismatch(
                f"{p}: backbone key {key!r} has shape {tuple(state[key].shape)}, "
                f"model expects {tuple(value.shape)}"
            )
    body.load_state_dict({k: state[k] for k in own}, strict=True)
    log.info("loaded backbone weights from %s (%d tensors)", p, len(own))


def padded_groups(images: Sequence[Any], size_divisible: int) -> list[list[int]]:
    """Indices of ``images`` (``[..., H, W]`` arrays) grouped by padded size.

    A batch is padded to its largest image rounded up to ``size_divisible``,
    and the network sees the padding (the head's GroupNorm over the whole
    map), so only images of one padded size are detected as they would be
    alone. The groups and the indices in each keep the input order.
    """
    d = size_divisible
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        h, w = int(im.shape[-2]), int(im.shape[-1])
        groups.setdefault((-(-h // d), -(-w // d)), []).append(i)
    return list(groups.values())


def in_breast(image: Tensor, det: dict[str, Tensor]) -> dict[str, Tensor]:
    """``det`` without the detections whose box centre lies outside the breast.

    The breast is :func:`common.imaging.preprocess.breast_mask` of the image's
    first channel (model space, ``[0, 1]``); an image with no plausible breast
    keeps every detection.
    """
    if not len(det["boxes"]):
        return det
    mask, factor = breast_mask(image[0].detach().float().cpu().numpy())
    keep = inside_mask(det["boxes"].detach().float().cpu().numpy(), mask, factor)
    idx = torch.from_numpy(np.flatnonzero(keep)).to(det["boxes"].device)
    return {k: v[idx] for k, v in det.items()}


@contextmanager
def without_breast_mask(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s detectors keep the detections outside the breast.

    For the detections a model trains from (hard negatives mined, second-stage
    candidates, a mean teacher's pseudo-boxes): ``ModelConfig.breast_mask``
    then only acts when a trained model predicts, so changing it never
    changes what is trained.
    """
    found = [m for m in model.modules() if isinstance(m, MammoFCOS)]
    old = [m.cfg for m in found]
    try:
        for m in found:
            m.cfg = replace(m.cfg, breast_mask=False)
        yield
    finally:
        for m, cfg in zip(found, old, strict=True):
            m.cfg = cfg


class MammoFCOS(FCOS):
    """FCOS detector for mammograms (one channel; two with ``cfg.contralateral``).

    ``self.cfg`` keeps the config; :meth:`parameter_groups` names which
    ``state_dict`` keys belong to ``backbone`` (``backbone.body.*``), ``neck``
    (``backbone.fpn.*``) and ``head`` (``head.*``).
    """

    cfg: ModelConfig

    def __init__(self, cfg: ModelConfig, backbone: BackboneWithFPN) -> None:
        head = ConfigurableFCOSHead(
            backbone.out_channels, 1, cfg.num_classes, cfg.head_convs
        )
        super().__init__(
            backbone,
            num_classes=cfg.num_classes,
            head=head,
            center_sampling_radius=cfg.center_sampling_radius,
            score_thresh=cfg.score_thresh,
            nms_thresh=cfg.nms_thresh,
            detections_per_img=cfg.detections_per_img,
            topk_candidates=cfg.topk_candidates,
        )
        self.transform = NoResizeTransform(
            cfg.image_mean, cfg.image_std, channels=cfg.input_channels
        )
        self.cfg = cfg

    def forward(  # type: ignore[override]
        self,
        images: list[Tensor],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> Any:
        """FCOS; in eval mode with ``cfg.tta_flip``, fused with the up-down flip.

        With ``cfg.breast_mask`` (eval mode) the detections outside the
        breast are dropped last (:func:`in_breast`).

        Flip test-time augmentation: the image and its up-down mirror are both
        detected and their findings fused by weighted box fusion
        (:meth:`_fuse`), so a lesion seen in both keeps its score and a
        view-specific false positive loses half. (Until stop 48 a finding's
        score was averaged with its best IoU >= 0.3 partner and the views
        NMS-merged: on the mini-MIAS recipe's fold models that scored mass
        CPM 0.057 [0.005, 0.09] below this fusion.)
        """
        if self.training:
            return super().forward(images, targets)
        if not self.cfg.tta_flip:
            out = self._detect(images)
        else:
            plain = self._detect(images)
            flipped = self._detect([im.flip(-2) for im in images])
            out = []
            for im, a, b in zip(images, plain, flipped, strict=True):
                back = vflip_boxes(b["boxes"], im.shape[-2])
                out.append(self._fuse(a, {**b, "boxes": back}))
        if self.cfg.breast_mask:
            out = [in_breast(im, o) for im, o in zip(images, out, strict=True)]
        return out

    def _detect(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Eval-mode FCOS, each image's findings independent of its batch.

        A batch is padded (right and bottom) to its largest image, and the
        network sees the padding (the head's GroupNorm normalizes over the
        whole padded map), so every score of an image would depend on which
        other images share its batch (in ``predict``, on the files given with
        it). Images are therefore run in groups of one
        padded size (height and width rounded up to ``size_divisible``), as
        each would be alone; same-sized images (one vendor's views, patches)
        still share a forward pass. Results keep the input order.
        """
        out: list[dict[str, Tensor]] = [{} for _ in images]
        for idx in padded_groups(images, self.transform.size_divisible):
            found = super().forward([images[i] for i in idx])
            for i, o in zip(idx, found, strict=True):
                out[i] = o
        return out

    def _fuse(self, a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
        """One image's findings in the plain and the mirrored view, fused.

        The project's weighted box fusion
        (:func:`common.detector.ensemble.fuse_detections`, the rule that fuses
        a site's models): a finding of both views keeps the mean of the two
        scores and their score-weighted mean box, one of a single view half
        its score. At most ``detections_per_img`` are kept.
        """
        from common.detector.ensemble import fuse_detections

        dev = a["boxes"].device
        fused = fuse_detections(
            [  # float32 first: under autocast boxes may be half precision
                {
                    "boxes": d["boxes"].detach().float().cpu().numpy(),
                    "scores": d["scores"].detach().float().cpu().numpy(),
                    "labels": d["labels"].detach().cpu().numpy(),
                }
                for d in (a, b)
            ],
            self.cfg.working_spacing_mm,
        )
        n = self.detections_per_img
        return {
            "boxes": torch.as_tensor(
                fused["boxes"][:n], dtype=torch.float32, device=dev
            ),
            "scores": torch.as_tensor(
                fused["scores"][:n], dtype=torch.float32, device=dev
            ),
            "labels": torch.as_tensor(fused["labels"][:n], device=dev),
        }

    def parameter_groups(self) -> dict[str, list[str]]:
        """``{"backbone": keys, "neck": keys, "head": keys}`` over ``state_dict``."""
        groups: dict[str, list[str]] = {"backbone": [], "neck": [], "head": []}
        for key in self.state_dict():
            if key.startswith("backbone.body."):
                groups["backbone"].append(key)
            elif key.startswith("backbone.fpn."):
                groups["neck"].append(key)
            elif key.startswith("head."):
                groups["head"].append(key)
            else:
                raise RuntimeError(f"state_dict key {key!r} is in no parameter group")
        return groups


def _fcos(cfg: ModelConfig, body: nn.Module, in_channels: list[int]) -> MammoFCOS:
    """FCOS on ``body``'s C3..C5 + P6/P7 (strides 8..128, anchors 8..128 px)."""
    c = cfg.fpn_channels
    backbone = BackboneWithFPN(
        body,
        return_layers=OrderedDict([("layer2", "0"), ("layer3", "1"), ("layer4", "2")]),
        in_channels_list=in_channels,
        out_channels=c,
        extra_blocks=LastLevelP6P7(c, c),
    )
    return MammoFCOS(cfg, backbone)


def _small_fcos(
    cfg: ModelConfig, widths: tuple[int, int, int, int], depth: int = 1
) -> MammoFCOS:
    if cfg.weights_path is not None:
        raise CheckpointMismatch(f"weights_path is not supported for arch {cfg.arch!r}")
    body: nn.Module = TinyResNet(
        norm_factory(cfg.norm), widths, cfg.input_channels, depth
    )
    if cfg.speck_channel:
        body = with_speck_channel(body, cfg.working_spacing_mm)
    return _fcos(cfg, body, list(widths[1:]))


def _resnet_fcos(cfg: ModelConfig, depth: int) -> MammoFCOS:
    body, in_channels = _resnet_body(depth, norm_factory(cfg.norm), cfg.input_channels)
    if cfg.weights_path is not None:
        load_backbone_weights(body, cfg.weights_path)
    if cfg.speck_channel:
        body = with_speck_channel(body, cfg.working_spacing_mm)
    return _fcos(cfg, body, in_channels)


@register_model("tiny")
def tiny_fcos(cfg: ModelConfig) -> MammoFCOS:
    """Stage widths 8/16/32/64: seconds per step on CPU at 128 px (tests)."""
    return _small_fcos(cfg, (8, 16, 32, 64))


@register_model("small")
def small_fcos(cfg: ModelConfig) -> MammoFCOS:
    """Stage widths 16/32/64/128: about 4x ``tiny`` (CPU studies)."""
    return _small_fcos(cfg, (16, 32, 64, 128))


@register_model("medium")
def medium_fcos(cfg: ModelConfig) -> MammoFCOS:
    """Stage widths 24/48/96/192, two blocks a stage (mini-MIAS, stop 52).

    Three times ``small``'s parameters for 1.5x its training time on CPU at
    256 px (``benchmarks.train_speed``): the FPN and the head dominate
    ``small``'s step, so the body grows cheaply.
    """
    return _small_fcos(cfg, (24, 48, 96, 192), depth=2)


@register_model("resnet18")
def resnet18_fcos(cfg: ModelConfig) -> MammoFCOS:
    """One-channel ResNet-18 body (``weights_path`` may load local weights)."""
    return _resnet_fcos(cfg, 18)


@register_model("resnet34")
def resnet34_fcos(cfg: ModelConfig) -> MammoFCOS:
    """One-channel ResNet-34 body (``weights_path`` may load local weights)."""
    return _resnet_fcos(cfg, 34)


@register_model("resnet50")
def resnet50_fcos(cfg: ModelConfig) -> MammoFCOS:
    """One-channel ResNet-50 body (``weights_path`` may load local weights)."""
    return _resnet_fcos(cfg, 50)
