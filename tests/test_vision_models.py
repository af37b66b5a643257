"""ResNet encoders: shapes, the normalisation choice, the per-task math, local pretrained weights."""
from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from fedtask import task as task_math
from fedtask.config import ConfigError, load_config
from fedtask.data.base import TaskSpec
from fedtask.models import build_model, initial_private_state
from fedtask.models_vision import FrozenBatchNorm2d


def vision_config(encoder: str, norm: str = "group", *extra: str) -> dict:
    return load_config(None, ["data.name=femnist", f"model.encoder={encoder}", f"model.norm={norm}",
                              "model.embedding_dim=8", *extra])


def image_taskset(channels: int = 1, size: int = 28, classes: int = 62) -> TaskSpec:
    return TaskSpec(classes, "image", (channels, size, size))


@pytest.mark.parametrize("encoder,channels,size", [("resnet8", 1, 28), ("resnet18", 3, 32), ("resnet34", 1, 28),
                                                   ("resnet50", 3, 32)])
def test_encoders_embed_to_the_bottleneck_dimension(encoder, channels, size):
    model = build_model(vision_config(encoder), image_taskset(channels, size))
    x = torch.randn(3, channels, size, size)
    assert model.embed(x).shape == (3, 8) and model(x).shape == (3, 62)
    assert model.encoder.bottleneck.out_features == 8
    assert all(not model.is_private(n) for n in model.shared_parameter_names())


def test_resnet8_is_small():
    model = build_model(vision_config("resnet8"), image_taskset())
    encoder_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    assert 60_000 < encoder_params < 100_000


@pytest.mark.parametrize("norm", ["group", "frozen_batch"])
def test_embeddings_do_not_depend_on_the_rest_of_the_batch(norm):
    """The adversary's oracle must answer the same for an image whatever it is queried with."""
    model = build_model(vision_config("resnet8", norm), image_taskset())
    x = torch.randn(6, 1, 28, 28)
    together = model.embed(x)
    alone = torch.cat([model.embed(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_frozen_batch_norm_keeps_its_statistics_through_a_training_round():
    model = build_model(vision_config("resnet18", "frozen_batch"), image_taskset(3, 32, 2))
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    shared = {k: v for k, v in model.state_dict().items() if not model.is_private(k)}
    private = initial_private_state(model, 0, 0)
    x, y = torch.randn(4, 3, 32, 32) * 3 + 1, torch.tensor([0, 1, 0, 1])
    _, grads, loss = task_math.local_round(model, shared, private, x, y, 0.1, 1e-3, 2, False,
                                           model.shared_parameter_names())
    assert torch.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if "running" in k)
    assert any(k.endswith("bn1.weight") for k in grads)  # the affine parameters still train
    assert not any("running" in k for k in grads)


def test_group_norm_encoder_trains_under_functional_call():
    model = build_model(vision_config("resnet8"), image_taskset())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    shared = {k: v for k, v in model.state_dict().items() if not model.is_private(k)}
    private = initial_private_state(model, 0, 0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 62, (8,))
    _, grads, _ = task_math.local_round(model, shared, private, x, y, 0.1, 1e-3, 1, False,
                                        model.shared_parameter_names())
    assert set(grads) == set(model.shared_parameter_names())
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())


def test_pretrained_torchvision_weights_load_from_pth_and_safetensors(tmp_path):
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_(-1, 1)
    state = reference.state_dict()
    torch.save(state, tmp_path / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "resnet18.safetensors"))
    for file in ("resnet18.pth", "resnet18.safetensors"):
        config = vision_config("resnet18", "frozen_batch", f"model.pretrained_path={tmp_path / file}")
        model = build_model(config, image_taskset(3, 32, 2))
        loaded = model.encoder.backbone.state_dict()
        assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
        assert torch.equal(loaded["bn1.running_mean"], state["bn1.running_mean"])
        assert torch.equal(loaded["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    # GroupNorm keeps the affine parameters, ignores the statistics
    grouped = build_model(vision_config("resnet18", "group", f"model.pretrained_path={tmp_path / 'resnet18.pth'}"),
                          image_taskset(3, 32, 2))
    assert torch.equal(grouped.encoder.backbone.bn1.weight.detach(), state["bn1.weight"])


def test_pretrained_weights_that_do_not_fit_are_a_config_error(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ConfigError, match="model.pretrained_path: .*resnet18.pth.*resnet50"):
        build_model(vision_config("resnet50", "frozen_batch", f"model.pretrained_path={tmp_path / 'resnet18.pth'}"),
                    image_taskset(3, 32, 2))
    (tmp_path / "junk.safetensors").write_bytes(b"not tensors")
    with pytest.raises(ConfigError, match="model.pretrained_path: .*junk.safetensors"):
        build_model(vision_config("resnet18", "group", f"model.pretrained_path={tmp_path / 'junk.safetensors'}"),
                    image_taskset(3, 32, 2))


def test_unknown_norm_and_non_image_data_are_config_errors():
    with pytest.raises(ConfigError, match="model.norm"):
        build_model(vision_config("resnet8", "batch"), image_taskset())
    with pytest.raises(ConfigError, match="model.encoder"):
        build_model(vision_config("resnet8"), TaskSpec(2, "vector", (16,)))
