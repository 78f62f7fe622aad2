"""TimmBackbone: names, offline weights from local files, feature maps; config errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from shared.instantiate import instantiate
from shared.models.backbone import TimmBackbone, _select_model_weights, load_state_dict_file


@pytest.fixture(scope="module")
def resnet() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone("resnet18").eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ref(resnet, x) -> torch.Tensor:
    """The reference model's pooled output, computed once (CPU forwards are the cost here)."""
    with torch.no_grad():
        return resnet(x)


def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(ValueError) as info:
        TimmBackbone("resnet181")
    msg = str(info.value)
    assert "'resnet181'" in msg and "Did you mean" in msg
    assert "resnet18," in msg.split("Did you mean:")[1]


def test_pretrained_without_path_is_offline_error():
    with pytest.raises(ValueError) as info:
        TimmBackbone("resnet18", pretrained=True)
    msg = str(info.value)
    assert "backbone.pretrained_path" in msg and "offline" in msg and "Download" in msg


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "weights" / "resnet18.pth"
    with pytest.raises(FileNotFoundError) as info:
        TimmBackbone("resnet18", pretrained_path=str(missing))
    msg = str(info.value)
    assert str(missing) in msg and "local file" in msg


def _same_outputs(ref: torch.Tensor, path, x: torch.Tensor) -> None:
    torch.manual_seed(123)  # another init than `resnet`: only the file can make them equal
    model = TimmBackbone("resnet18", pretrained_path=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_local_weights_round_trip(resnet, ref, x, tmp_path):
    state = resnet.model.state_dict()
    plain = tmp_path / "resnet18.pth"
    torch.save(state, plain)
    _same_outputs(ref, plain, x)

    # A Lightning checkpoint: weights under "state_dict" with the module's prefix, plus
    # keys of other parts of the model (ignored) and non-tensor entries.
    ckpt = tmp_path / "last.ckpt"
    wrapped = {f"backbone.model.{k}": v for k, v in state.items()}
    wrapped["head.weight"] = torch.zeros(3, 512)
    torch.save({"state_dict": wrapped, "epoch": 3, "global_step": 10}, ckpt)
    _same_outputs(ref, ckpt, x)


@pytest.mark.parametrize(
    "prefix, outer",
    [("module.", None), ("model.", "model"), ("backbone.", "teacher"),
     ("net.backbone.model.", "state_dict")],  # the last: a metric-learning checkpoint
)  # fmt: skip
def test_wrapper_prefixes_are_stripped(resnet, tmp_path, prefix, outer):
    state = resnet.model.state_dict()
    path = tmp_path / "w.pt"
    inner = {f"{prefix}{k}": v for k, v in state.items()}
    inner[f"{prefix.split('.')[0]}_head.weight"] = torch.zeros(2)  # another part: ignored
    torch.save({outer: inner} if outer else inner, path)
    loaded = _select_model_weights(load_state_dict_file(path), state)
    assert list(loaded)[: len(state)] == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_dino_checkpoint_loads_the_teacher(resnet, tmp_path):
    """A DINO Lightning checkpoint holds student and teacher copies: the teacher is used."""
    state = resnet.model.state_dict()
    torch.manual_seed(5)
    student = TimmBackbone("resnet18").model.state_dict()
    ckpt = {f"student_backbone.model.{k}": v for k, v in student.items()}
    ckpt |= {f"teacher_backbone.model.{k}": v for k, v in state.items()}
    ckpt["student_head.last_layer.weight"] = torch.zeros(4, 4)
    path = tmp_path / "dino.ckpt"
    torch.save({"state_dict": ckpt, "hyper_parameters": {"out_dim": 4}}, path)
    loaded = TimmBackbone("resnet18", pretrained_path=str(path)).model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not torch.equal(loaded["conv1.weight"], student["conv1.weight"])


def test_safetensors_weights(resnet, ref, x, tmp_path):
    save_file = pytest.importorskip("safetensors.torch").save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in resnet.model.state_dict().items()}, str(path))
    _same_outputs(ref, path, x)


def test_weights_of_another_model_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "blocks.0.w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="does not fit 'resnet18'") as info:
        TimmBackbone("resnet18", pretrained_path=str(path))
    assert "missing keys" in str(info.value) and str(path) in str(info.value)
    TimmBackbone("resnet18", pretrained_path=str(path), strict=False)  # allowed when asked


def test_pooled_features(resnet, ref):
    assert resnet.num_features == 512 and resnet.feature_channels == [512]
    assert ref.shape == (1, 512)


def test_features_only_default_two_deepest_stages(resnet, ref, x, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(resnet.model.state_dict(), path)
    fm = TimmBackbone("resnet18", features_only=True, pretrained_path=str(path)).eval()
    assert fm.feature_channels == [256, 512] and fm.feature_strides == [16, 32]
    assert fm.num_features == 512
    with torch.no_grad():
        maps = fm(x)
    assert [tuple(m.shape) for m in maps] == [(1, 256, 4, 4), (1, 512, 2, 2)]
    # Same weights: global-average-pooling the last map is the pooled backbone output.
    torch.testing.assert_close(maps[-1].mean((2, 3)), ref, atol=1e-5, rtol=1e-5)


def test_features_only_out_indices():
    fm = TimmBackbone("resnet18", features_only=True, out_indices=[1, 2])
    assert fm.feature_channels == [64, 128] and fm.feature_strides == [4, 8]


# --- building from config ----------------------------------------------------------------


def test_instantiate_unimportable_target_names_key_and_target():
    cfg = OmegaConf.create({"_target_": "shared.models.backbone.TimmBackbon", "name": "x"})
    with pytest.raises(ImportError) as info:
        instantiate(cfg, "backbone")
    msg = str(info.value)
    assert "backbone._target_=" in msg and "'shared.models.backbone.TimmBackbon'" in msg
    cfg = OmegaConf.create({"_target_": "no_such_package.Model"})
    with pytest.raises(ImportError, match="model.net._target_='no_such_package.Model'"):
        instantiate(cfg, "model.net")


def test_instantiate_builds_and_keeps_other_errors():
    cfg = OmegaConf.create({"_target_": "shared.models.backbone.TimmBackbone", "name": "resnet18"})
    assert isinstance(instantiate(cfg, "backbone"), TimmBackbone)
    assert isinstance(instantiate(dict(cfg), "backbone"), TimmBackbone)  # a plain mapping
    bad = OmegaConf.create({"_target_": "shared.models.backbone.TimmBackbone", "name": "resnet181"})
    with pytest.raises(Exception, match="Did you mean") as info:  # not an import problem
        instantiate(bad, "backbone")
    assert not isinstance(info.value, ImportError)


def test_instantiate_without_target():
    with pytest.raises(ValueError, match="'data.source' has no _target_"):
        instantiate(OmegaConf.create({"root": "x"}), "data.source")
    with pytest.raises(ValueError, match="'logger' is empty"):
        instantiate(None, "logger")
