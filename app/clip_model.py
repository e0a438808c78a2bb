"""A trained RECO model wherever an open_clip model goes: CLIP_benchmark, clip-retrieval, plain scripts.

    from app import clip_model
    model, preprocess_train, preprocess = clip_model.create_model_and_transforms("reco:birds-reco")
    tokenizer = clip_model.get_tokenizer("reco:birds-reco")
    image_features = model.encode_image(preprocess(img).unsqueeze(0))   # refined with the memory
    text_features = model.encode_text(tokenizer(["a photo of a cedar waxwing"]))

The model is a `torch.nn.Module` in eval mode holding the frozen open_clip model and the fusion layers (no
gradients anywhere). `encode_image` / `encode_text` run the frozen tower, then retrieve from the memory and fuse,
exactly as `RecoEncoder` does, for batches of any size; `image_retrieval` / `text_retrieval` switch each side
off (the frozen CLIP embedding). The memory is the model's training memory (following its active version) or
`memory="NAME[@VERSION]"`. A library room: it uses `app.encoder`, which never imports it.
"""

from __future__ import annotations

import numpy as np
import torch

from .encoder import RecoEncoder
from .errors import RecoError

PREFIX = "reco:"


def _model_name(name: str) -> str:
    if not name.startswith(PREFIX) or len(name) == len(PREFIX):
        raise RecoError(f"{name!r} is not a RECO model name: use 'reco:MODEL' (see `reco model list`)")
    return name[len(PREFIX):]


class RecoCLIP(torch.nn.Module):
    """open_clip's CLIP interface (encode_image, encode_text, forward, logit_scale) over a RecoEncoder."""

    def __init__(self, encoder: RecoEncoder):
        super().__init__()
        self._encoder = encoder
        self.clip = encoder.backbone.model  # submodules: .to(), .eval(), state_dict() work as for open_clip
        self.fusion = encoder.fusion
        self.image_retrieval = encoder.image_retrieval
        self.text_retrieval = encoder.text_retrieval
        self.requires_grad_(False)
        self.eval()

    @property
    def logit_scale(self) -> torch.nn.Parameter:
        return self.clip.logit_scale

    @property
    def encoder(self) -> RecoEncoder:
        return self._encoder

    def train(self, mode: bool = True) -> "RecoCLIP":  # frozen: always in eval mode
        return super().train(False)

    def _refine(self, z: torch.Tensor, side: str, on: bool) -> torch.Tensor:
        if not on:
            return z
        device = next(self.clip.parameters()).device
        self._encoder.device = str(device)  # follow .to(): the fusion layers moved with the module
        out = self._encoder.refine(z.detach().float().cpu().numpy(), side)
        return torch.from_numpy(np.ascontiguousarray(out)).to(z.device)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Refined image embeddings [n, D]; RECO's embeddings are unit length whatever `normalize` says."""
        z = self.clip.encode_image(image, normalize=True)
        return self._refine(z, "image", self.image_retrieval)

    @torch.no_grad()
    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.clip.encode_text(text, normalize=True)
        return self._refine(z, "text", self.text_retrieval)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """(image_features, text_features, logit_scale.exp()), as open_clip's CLIP.forward."""
        image_features = self.encode_image(image) if image is not None else None
        text_features = self.encode_text(text) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def create_model(model_name: str, memory: str | None = None, device: str | torch.device | None = None,
                 image_retrieval: bool = True, text_retrieval: bool = True, runtime=None,
                 checkpoint: str = "best") -> RecoCLIP:
    enc = RecoEncoder.load(_model_name(model_name), memory=memory, runtime=runtime,
                           device=str(device) if device is not None else None, image_retrieval=image_retrieval,
                           text_retrieval=text_retrieval, checkpoint=checkpoint)
    return RecoCLIP(enc)


def create_model_and_transforms(model_name: str, memory: str | None = None,
                                device: str | torch.device | None = None, **kwargs):
    """(model, preprocess_train, preprocess_val), as `open_clip.create_model_and_transforms`."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = create_model(model_name, memory=memory, device=device, **kwargs)
    cfg = PreprocessCfg(**model.clip.visual.preprocess_cfg)
    return model, image_transform_v2(cfg, is_train=True), model.encoder.backbone.preprocess


def get_tokenizer(model_name: str, runtime=None):
    """The tokenizer of the model's frozen backbone, as `open_clip.get_tokenizer`."""
    from .backbone import get_backbone
    from .runtime import Runtime

    rt = runtime or Runtime()
    enc = RecoEncoder.load(_model_name(model_name), runtime=rt, load_backbone=False)
    return get_backbone(enc.info["backbone"], rt.settings.device, rt.settings.offline).tokenizer
