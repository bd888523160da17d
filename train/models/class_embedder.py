"""Small conditioning modules that diffusers does not ship, saved and loaded with the diffusers mixins.

``ClassEmbedder`` turns integer class labels into a one-token cross-attention context, the conditioning scheme of
the class-conditional CompVis LDM-4 (ImageNet) checkpoint. Its state dict uses the same key and layout as that
checkpoint's ``cond_stage_model`` (``embedding.weight`` with ``num_classes + 1`` rows, the last one being the
null class of classifier-free guidance), so a quantization recipe written against the shipped digits teacher
applies unchanged to the large model.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

__all__ = ["ClassEmbedder"]


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Learned class embedding used as a single-token cross-attention context.

    Row ``num_classes`` of the table is the null class ("no label"), which training feeds with some probability
    (label dropout) so that the same network also learns the unconditional score needed for classifier-free
    guidance.

    Args:
        num_classes: Number of real classes; labels ``0 .. num_classes - 1`` are real, ``num_classes`` is null.
        embed_dim: Width of the embedding; must equal the UNet's ``cross_attention_dim``.

    Example:
        >>> embedder = ClassEmbedder(num_classes=10, embed_dim=64)
        >>> embedder(torch.tensor([3, embedder.null_label])).shape
        torch.Size([2, 1, 64])
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, num_classes: int = 1000, embed_dim: int = 512) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        # One extra row for the null class, exactly as LDM's ClassEmbedder (1001 rows for ImageNet).
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_label(self) -> int:
        """Index of the null (unconditional) class, equal to ``num_classes``."""
        return self.config.num_classes

    @property
    def embed_dim(self) -> int:
        """Width of one context token (the UNet's ``cross_attention_dim``)."""
        return self.config.embed_dim

    def forward(self, labels: Tensor) -> Tensor:
        """Embed class labels as a one-token context sequence.

        Args:
            labels: Integer labels of shape ``(B,)`` with values in ``[0, num_classes]``; ``num_classes`` means
                "unconditional".

        Returns:
            Context of shape ``(B, 1, embed_dim)``, to pass as ``encoder_hidden_states`` to the UNet.
        """
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
        return self.embedding(labels.long())[:, None, :]

    def null_labels(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """Labels of the null class for a batch, for the unconditional branch of classifier-free guidance.

        Args:
            batch_size: Number of labels ``B``.
            device: Device of the result; defaults to the embedding's device.

        Returns:
            Long tensor of shape ``(B,)`` filled with ``null_label``.
        """
        device = self.embedding.weight.device if device is None else device
        return torch.full((batch_size,), self.null_label, dtype=torch.long, device=device)
