"""Detector core: registry, no-resize, losses, groups and parameter split."""

from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.detector.model import (
    ModelConfig,
    Personalization,
    available_models,
    build_detector,
    head_keys,
    norm_keys,
    parameter_groups,
    register_model,
    registry,
    shared_and_personal,
)
from common.errors import ConfigError

from .conftest import square_image


def tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(ModelConfig(arch="tiny", **kw))


BUILTIN = {"tiny", "small", "medium", "resnet18", "resnet34", "resnet50"}


def test_registry_lists_names_and_rejects_unknown_at_build_time():
    assert BUILTIN <= set(available_models())
    with pytest.raises(ConfigError, match="arch: unknown model 'vgg'.*resnet18.*tiny"):
        build_detector(ModelConfig(arch="vgg"))


def test_a_user_model_is_added_next_to_the_builtin_ones(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_model("user-net")
    def user_net(cfg: ModelConfig) -> torch.nn.Module:
        return torch.nn.Conv2d(1, cfg.num_classes, 1)

    assert set(available_models()) == BUILTIN | {"user-net"}
    assert isinstance(build_detector(ModelConfig(arch="user-net")), torch.nn.Conv2d)
    assert build_detector(ModelConfig(arch="tiny", fpn_channels=16)).cfg.arch == "tiny"
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        register_model("tiny")(user_net)


def test_config_from_yaml_errors_name_file_and_key(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("arch: resnet18\nfpn_channels: 64\nhead_convs: 2\n")
    cfg = load_config(p, ModelConfig)
    assert cfg.arch == "resnet18" and cfg.norm == "batch"
    p.write_text("norm: layer\n")
    with pytest.raises(ConfigError, match="norm"):
        load_config(p, ModelConfig)
    p.write_text("num_classes: 3\n")
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(p, ModelConfig)


def test_eval_output_format_model_space_no_resize():
    model = tiny().eval()
    # odd, non-multiple-of-32 sizes: outputs must stay inside each input image
    imgs = [torch.rand(1, 100, 70), torch.rand(1, 150, 130)]
    with torch.no_grad():
        out = model(imgs)
    assert len(out) == 2
    for o, im in zip(out, imgs, strict=True):
        assert set(o) == {"boxes", "scores", "labels"}
        assert o["boxes"].shape[1] == 4 and o["boxes"].dtype == torch.float32
        assert len(o["boxes"]) > 0  # untrained prior 0.01 > floor? at least some
        h, w = im.shape[-2:]
        assert float(o["boxes"][:, [0, 2]].max()) <= w
        assert float(o["boxes"][:, [1, 3]].max()) <= h
        assert float(o["boxes"].min()) >= 0
        assert set(o["labels"].tolist()) <= {0, 1}
        assert len(o["boxes"]) <= 100


def test_transform_does_not_resize():
    model = tiny()
    model.train()
    imgs = [torch.rand(1, 100, 70)]
    tg = [{"boxes": torch.tensor([[10.0, 20, 30, 40]]), "labels": torch.tensor([0])}]
    batch, tg2 = model.transform(imgs, tg)
    assert batch.image_sizes == [(100, 70)]
    assert batch.tensors.shape[-2:] == (128, 96)  # padded to /32 only
    assert torch.equal(tg2[0]["boxes"], tg[0]["boxes"])
    model.eval()
    batch, _ = model.transform([torch.rand(1, 1000, 40)])
    assert batch.image_sizes == [(1000, 40)]


def test_tiny_learns_a_bright_square():
    torch.manual_seed(0)
    model = tiny()
    model.train()
    img = square_image()
    tg = [{"boxes": torch.tensor([[40.0, 48, 72, 80]]), "labels": torch.tensor([0])}]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = sum(model([img], tg).values())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_negative_image_zero_box_loss():
    model = tiny()
    model.train()
    tg = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model([torch.rand(1, 128, 128)], tg)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["bbox_regression"].detach()) == 0.0
    assert float(losses["bbox_ctrness"].detach()) == 0.0
    assert float(losses["classification"].detach()) > 0.0


def _logit_grad(model, tg):
    """Classification loss and the gradient it sends to the class logits."""
    kept = {}

    def keep(_mod, _inp, out):
        out["cls_logits"].retain_grad()
        kept.update(out)

    h = model.head.register_forward_hook(keep)
    try:
        loss = model([square_image()], tg)["classification"]
        loss.backward()
    finally:
        h.remove()
    return float(loss.detach()), kept["cls_logits"].grad[0].abs().sum(dim=1)


def test_ignore_regions_take_no_classification_loss():
    """An ignore box's background locations get no gradient; the rest the same."""
    lesion = {"boxes": torch.tensor([[40.0, 48, 72, 80]]), "labels": torch.tensor([0])}
    ign = torch.tensor([[0.0, 0.0, 32.0, 128.0]])  # the image's left quarter
    model = tiny()
    model.train()
    base_loss, base_grad = _logit_grad(model, [lesion])
    model.zero_grad()
    loss, grad = _logit_grad(model, [{**lesion, "ignore": ign}])
    images, _ = model.transform([square_image()])
    feats = list(model.backbone(images.tensors).values())
    anchors = model.anchor_generator(images, feats)[0]
    cx = (anchors[:, 0] + anchors[:, 2]) / 2
    inside = cx <= 32.0
    assert inside.any() and (~inside).any()
    assert float(grad[inside].abs().max()) == 0.0  # taught nothing there
    assert float(base_grad[inside].abs().max()) > 0.0  # background before
    # outside the region (and the lesion's positives) exactly as without it
    assert torch.allclose(grad[~inside], base_grad[~inside])
    assert loss < base_loss
    # a lesion inside an ignore region stays a lesion
    model.zero_grad()
    cover, cover_grad = _logit_grad(
        model, [{**lesion, "ignore": torch.tensor([[0.0, 0.0, 128.0, 128.0]])}]
    )
    assert cover > 0.0 and float(cover_grad.max()) > 0.0


def test_ignore_regions_reach_the_loss_through_targets_to_device(caplog):
    from common.detector.recipe import targets_to_device

    t = {
        "boxes": torch.tensor([[1.0, 2, 5, 9]]),
        "labels": torch.tensor([1]),
        "ignore": torch.tensor([[0.0, 0, 4, 4], [3.0, 3, 3, 8]]),
        "key": "img-7",
    }
    (out,) = targets_to_device([t], torch.device("cpu"))
    assert out["ignore"].tolist() == [[0.0, 0.0, 4.0, 4.0]]
    assert "img-7" in caplog.text and "ignore" in caplog.text
    (plain,) = targets_to_device([{**t, "ignore": torch.zeros(0, 4)}], "cpu")
    assert set(plain) == {"boxes", "labels"}


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_norm_kind(norm):
    model = tiny(norm=norm)
    mods = list(model.backbone.body.modules())
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in mods)
    has_gn = any(isinstance(m, torch.nn.GroupNorm) for m in mods)
    assert has_bn == (norm == "batch") and has_gn == (norm == "group")
    if norm == "group":
        assert not any("running_mean" in k for k in model.state_dict())


def test_head_convs_configurable():
    def n_convs(m):
        return sum(
            isinstance(x, torch.nn.Conv2d)
            for x in m.head.classification_head.conv.modules()
        )

    assert n_convs(tiny(head_convs=2)) == 2
    assert n_convs(tiny(head_convs=4)) == 4
    assert tiny(fpn_channels=32).backbone.out_channels == 32


def test_groups_cover_state_dict():
    model = tiny()
    g = parameter_groups(model)
    keys = list(model.state_dict())
    flat = g["backbone"] + g["neck"] + g["head"]
    assert sorted(flat) == sorted(keys) and len(flat) == len(set(flat))
    assert all(k.startswith("head.") for k in head_keys(model))
    assert len(g["neck"]) > 0 and len(g["head"]) > 0


@pytest.mark.parametrize("local_norm", [False, True])
@pytest.mark.parametrize("personal_head", [False, True])
def test_shared_and_personal_split(local_norm, personal_head):
    model = tiny()
    keys = list(model.state_dict())
    pers = Personalization(local_norm=local_norm, personal_head=personal_head)
    shared, personal = shared_and_personal(model, pers)
    assert not set(shared) & set(personal)
    assert sorted(shared + personal) == sorted(keys)
    bn_keys = [k for k in keys if "running_" in k or "num_batches_tracked" in k]
    assert bn_keys
    if local_norm:
        assert set(bn_keys) <= set(personal)
        assert set(personal) == set(norm_keys(model))
        assert "backbone.body.bn1.weight" in personal
        assert "backbone.body.conv1.weight" in shared
    else:
        # only BatchNorm's integer step counters stay home
        assert personal and all(k.endswith("num_batches_tracked") for k in personal)
        assert "backbone.body.bn1.running_mean" in shared
    # the global head is shared in every regime
    assert any(k in shared for k in head_keys(model))


def test_medium_is_deeper_and_wider_and_small_keeps_its_checkpoint_names():
    torch.manual_seed(0)
    small = build_detector(ModelConfig(arch="small", speck_channel=True))
    medium = build_detector(ModelConfig(arch="medium", speck_channel=True))
    sk, mk = set(small.state_dict()), set(medium.state_dict())
    # one block a stage is the stage itself: every saved tiny/small model loads
    assert "backbone.body.layer3.conv1.weight" in sk
    assert not any(".layer3.0." in k for k in sk)
    # two blocks a stage, torchvision's ResNet names
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert f"backbone.body.{stage}.1.conv2.weight" in mk
        assert not any(f"{stage}.2." in k for k in mk)
    assert medium.state_dict()["backbone.body.layer4.1.conv2.weight"].shape[0] == 192
    n = sum(p.numel() for p in medium.backbone.body.parameters())
    assert n > 4 * sum(p.numel() for p in small.backbone.body.parameters())
    # FedBN sees every norm layer of the extra blocks
    assert "backbone.body.layer2.1.bn2.running_mean" in norm_keys(medium)
    medium.eval()
    (out,) = medium([torch.rand(1, 96, 80)])
    assert out["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="depth must be >= 1"):
        from common.detector.model.fcos import TinyResNet

        TinyResNet(torch.nn.BatchNorm2d, (8, 16, 32, 64), depth=0)


def test_resnet18_one_channel_and_weights_path(tmp_path):
    import torchvision

    cfg = ModelConfig(arch="resnet18")
    model = build_detector(cfg)
    assert model.backbone.body.conv1.in_channels == 1
    # a local 3-channel torchvision ResNet state_dict is accepted (summed conv1)
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    m2 = build_detector(ModelConfig(arch="resnet18", weights_path=path))
    w = m2.backbone.body.conv1.weight
    assert torch.allclose(w, ref.conv1.weight.sum(1, keepdim=True))
    # a wrong file is refused naming the key
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    from common.errors import CheckpointMismatch

    with pytest.raises(CheckpointMismatch, match="missing"):
        build_detector(ModelConfig(arch="resnet18", weights_path=path))
