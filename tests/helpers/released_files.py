"""Builders of released-format CXR-CLIP files, written directly on torchvision / transformers modules.

Independent of cxr_search on purpose: the names follow ``docs/compatibility.md`` (transformers 4.26
naming for Swin, ``embeddings.position_ids`` stored), the config holds real omegaconf containers, weights are random.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn
from transformers import BertConfig, BertModel, SwinConfig, SwinModel

BERT_VOCAB_SIZE = 28996
WORDS = (
    "the lungs are clear no acute cardiopulmonary process there is a large small moderate right left "
    "bilateral pleural effusion effusions with basal basilar atelectasis pneumothorax heart size normal "
    "enlarged cardiomegaly consolidation opacity opacities nodule mass edema pulmonary vascular "
    "congestion of and in is seen evidence stable unchanged compared prior study lobe upper lower "
    "middle focal mild severe support devices tube line catheter tip projects over findings impression"
).split()


def write_bert_vocab(root: Path) -> Path:
    """A 28,996-token BERT vocabulary laid out like Bio_ClinicalBERT's (ids 0, 100-103 special)."""
    vocab: List[str] = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab += list(chars) + ["##" + c for c in chars]
    vocab += [w for w in dict.fromkeys(WORDS)]
    vocab += ["##s", "##ed", "##ing", "##al", "##ic", "##ion"]
    i = 0
    while len(vocab) < BERT_VOCAB_SIZE:
        vocab.append(f"[filler{i}]")
        i += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (root / "config.json").write_text('{"model_type": "bert", "vocab_size": 28996}\n', encoding="utf-8")
    return root


def bert_base() -> BertModel:
    cfg = BertConfig(vocab_size=BERT_VOCAB_SIZE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512)
    return BertModel(cfg, add_pooling_layer=True).eval()


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    # Fresh BatchNorm stats are 0/1, which would hide a wrong eval-mode path.
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5 + 0.75)
            m.num_batches_tracked.fill_(1234)


def _swin_old_name(name: str) -> str:
    """Current transformers Swin name -> the 4.26 name stored in the released files."""
    rules = [
        (r"(blocks\.\d+\.attention\.)q_proj\.", r"\1self.query."),
        (r"(blocks\.\d+\.attention\.)k_proj\.", r"\1self.key."),
        (r"(blocks\.\d+\.attention\.)v_proj\.", r"\1self.value."),
        (r"(blocks\.\d+\.attention\.)o_proj\.", r"\1output.dense."),
        (r"(blocks\.\d+\.attention\.)relative_position_bias\.", r"\1self."),
        (r"(blocks\.\d+\.)mlp\.fc1\.", r"\1intermediate.dense."),
        (r"(blocks\.\d+\.)mlp\.fc2\.", r"\1output.dense."),
    ]
    for pat, rep in rules:
        name = re.sub(pat, rep, name)
    return name


def released_config(backbone: str) -> Dict:
    """Nested dicts with omegaconf containers inside, like the released ``config``."""
    cfg = OmegaConf.create({
        "model": {
            "name": "clip_custom",
            "image_encoder": {"name": "resnet", "resnet_type": "resnet50", "pretrained": True, "source": "torchvision"}
            if backbone == "r50"
            else {"name": "swin", "model_type": "swin", "pretrained": True, "source": "huggingface",
                  "name_or_path": "microsoft/swin-tiny-patch4-window7-224"},
            "text_encoder": {"name": "huggingface", "pretrained": True, "source": "huggingface",
                             "name_or_path": "emilyalsentzer/Bio_ClinicalBERT", "gradient_checkpointing": False,
                             "pooling": "eos", "cache_dir": "/tmp/cache"},
            "projection_head": {"name": "linear", "proj_dim": 512},
        },
        "transform": {"train": {"RandomResizedCrop": {"size": 224, "scale": [0.8, 1.1]}}},
        "scheduler": {"config": {"total_epochs": 15, "warmup_epochs": 1}},
    })
    plain = OmegaConf.to_container(cfg)
    # The released configs are plain dicts holding omegaconf containers at the leaves.
    plain["transform"]["train"]["RandomResizedCrop"]["scale"] = cfg.transform.train.RandomResizedCrop.scale
    plain["model"]["projection_head"] = cfg.model.projection_head
    return plain


class Reference(nn.Module):
    """The reference architecture built directly on torchvision / transformers modules."""

    def __init__(self, backbone: str, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.backbone = backbone
        if backbone == "r50":
            self.resnet = torchvision.models.resnet50()
            self.resnet.fc = nn.Identity()
            _randomise_bn(self.resnet, gen)
            feat = 2048
        else:
            self.swin = SwinModel(SwinConfig(), add_pooling_layer=True)
            feat = 768
        self.bert = bert_base()
        self.image_projection = nn.Linear(feat, 512)
        self.text_projection = nn.Linear(768, 512)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))
        self.eval()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.backbone == "r50":
            return self.resnet(pixels)
        return self.swin(pixel_values=pixels).last_hidden_state[:, 0]

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_projection(self.image_features(pixels)), dim=-1)

    @torch.no_grad()
    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        eos = hidden[torch.arange(len(ids)), mask.sum(-1) - 1]
        return nn.functional.normalize(self.text_projection(eos), dim=-1)

    def released_state_dict(self) -> Dict[str, torch.Tensor]:
        sd: Dict[str, torch.Tensor] = {}
        if self.backbone == "r50":
            for k, v in self.resnet.state_dict().items():
                sd[f"image_encoder.resnet.{k}"] = v.clone()
        else:
            for k, v in self.swin.state_dict().items():
                sd[f"image_encoder.image_encoder.{_swin_old_name(k)}"] = v.clone()
            for k, v in self.swin.named_buffers():
                if k.endswith("relative_position_index"):
                    sd[f"image_encoder.image_encoder.{_swin_old_name(k)}"] = v.clone()
        for k, v in self.bert.state_dict().items():
            sd[f"text_encoder.text_encoder.{k}"] = v.clone()
        sd["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
        sd["image_projection.projection.weight"] = self.image_projection.weight.detach().clone()
        sd["image_projection.projection.bias"] = self.image_projection.bias.detach().clone()
        sd["text_projection.projection.weight"] = self.text_projection.weight.detach().clone()
        sd["text_projection.projection.bias"] = self.text_projection.bias.detach().clone()
        sd["logit_scale"] = self.logit_scale.detach().clone()
        return sd


def save_released(path: Path, state: Dict[str, torch.Tensor], backbone: str) -> Path:
    """``torch.save`` a dict shaped like the released files (model, config, optimizer, ...)."""
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=5e-5)
    p.grad = torch.ones(3)
    opt.step()
    torch.save(
        {"model": state, "config": released_config(backbone), "optimizer": opt.state_dict(),
         "scheduler": {"last_epoch": 10, "_step_count": 11, "base_lrs": [5e-5]}, "epoch": 15, "train_loss": 1.25},
        path,
    )
    return path


def expected_counts() -> Tuple[int, int]:
    """Total keys of the R50 and Swin released state dicts (``docs/compatibility.md`` section 2)."""
    return 523, 436
