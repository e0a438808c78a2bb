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

Devices follow open_clip, not RECO_DEVICE: `create_model(..., device="cpu")` is the default (as
`open_clip.create_model`), `device="cuda"` puts the tower and the fusion layers on the GPU, and `model.to(device)`
later moves both (the retrieval follows the module). Each call builds its own tower, as open_clip does, so moving
one model never moves another's. Inputs on another device than the model are moved to the model's device (a
CPU batch into a CUDA model works; open_clip itself would fail in torch), and the embeddings are returned on the
model's device, as open_clip returns them. The tower runs at the product's precision so the numbers are
`reco eval`'s: float16 autocast on CUDA (as `Backbone`), float32 on the CPU; the fusion layers always run in
float32, even inside a caller's autocast (CLIP_benchmark's `amp=True`).
"""

from __future__ import annotations

import contextlib

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

    @property
    def device(self) -> torch.device:
        """Where the tower's weights are now (after any `.to()`): inputs go there, outputs come from there."""
        return next(self.clip.parameters()).device

    def train(self, mode: bool = True) -> "RecoCLIP":  # frozen: always in eval mode
        return super().train(False)

    def _follow(self) -> torch.device:
        """The module's device, told to the encoder: `.to()` moved the tower and the fusion layers, not it."""
        device = self.device
        self._encoder.device = self._encoder.backbone.device = str(device)
        return device

    @staticmethod
    def _precision(device: torch.device):
        return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    def _refine(self, z: torch.Tensor, side: str, on: bool, device: torch.device) -> torch.Tensor:
        from .backbone import _to_unit_f32

        z = _to_unit_f32(z.detach())  # float32 unit rows, rounded as Backbone rounds them (bit for bit)
        if on:
            off = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") \
                else contextlib.nullcontext()
            with off:  # the fusion layers in float32, as RecoEncoder runs them, whatever the caller's autocast
                z = self._encoder.refine(z, side)
        return torch.from_numpy(np.ascontiguousarray(z)).to(device)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Refined image embeddings [n, D] on the model's device; unit length whatever `normalize` says."""
        device = self._follow()
        with self._precision(device):
            z = self.clip.encode_image(image.to(device, non_blocking=True), normalize=True)
        return self._refine(z, "image", self.image_retrieval, device)

    @torch.no_grad()
    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        device = self._follow()
        with self._precision(device):
            z = self.clip.encode_text(text.to(device, non_blocking=True), normalize=True)
        return self._refine(z, "text", self.text_retrieval, device)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """(image_features, text_features, logit_scale.exp()), as open_clip's CLIP.forward."""
        image_features = self.encode_image(image) if image is not None else None
        text_features = self.encode_text(text) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def _check_device(device: str | torch.device | None) -> str:
    """open_clip's default (the CPU) for None; a CUDA device that is not there fails here, in one line."""
    try:
        dev = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as exc:
        raise RecoError(f"device={device!r} is not a torch device: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecoError(f"device={device!r} but no CUDA device is available here; use device='cpu'")
    return str(dev)


def create_model(model_name: str, memory: str | None = None, device: str | torch.device | None = "cpu",
                 image_retrieval: bool = True, text_retrieval: bool = True, runtime=None,
                 checkpoint: str = "best") -> RecoCLIP:
    """The model on `device` (default the CPU, as `open_clip.create_model`; RECO_DEVICE does not apply)."""
    from .backbone import Backbone

    device = _check_device(device)
    enc = RecoEncoder.load(_model_name(model_name), memory=memory, runtime=runtime, device=device,
                           image_retrieval=image_retrieval, text_retrieval=text_retrieval, checkpoint=checkpoint,
                           load_backbone=False)
    # a tower of its own, not get_backbone's process-wide one: `.to()` on this model must not move the tower
    # under another encoder (a server's, an evaluation's) in the same process
    enc.backbone = Backbone.load(enc.info["backbone"], device=device, offline=enc.rt.settings.offline)
    return RecoCLIP(enc)


def create_model_and_transforms(model_name: str, memory: str | None = None,
                                device: str | torch.device | None = "cpu", **kwargs):
    """(model, preprocess_train, preprocess_val), as `open_clip.create_model_and_transforms`."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = create_model(model_name, memory=memory, device=device, **kwargs)
    cfg = PreprocessCfg(**model.clip.visual.preprocess_cfg)
    return model, image_transform_v2(cfg, is_train=True), model.encoder.backbone.preprocess


def get_tokenizer(model_name: str, runtime=None):
    """The tokenizer of the model's frozen backbone, as `open_clip.get_tokenizer`: no tower is built for it."""
    import open_clip

    from .backbone import BackboneSpec, _register_config

    enc = RecoEncoder.load(_model_name(model_name), runtime=runtime, device="cpu", load_backbone=False)
    spec = BackboneSpec.parse(enc.info["backbone"])
    return open_clip.get_tokenizer(_register_config(spec) if spec.config else spec.model)
