"""Prototype classification, written once: easyfsl's two-method few-shot contract.

``process_support_set(support_images, support_labels)`` turns the labelled support images into
one *prototype* per class (the mean embedding); ``forward(query_images)`` then gives logits:
minus the squared Euclidean distance to each prototype (Snell et al. 2017), or a scaled cosine
similarity. :class:`~tl_lightning.modules.ProtoNetModule` (episodes, predict) and
:func:`~tl_lightning.modules.predict_few_shot` both classify through :class:`PrototypeClassifier`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tl_lightning.errors import DataError

DISTANCES = ("euclidean", "cosine")


def remap_labels(
    support_labels: torch.Tensor, query_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Map an episode's class ids to ``0..N-1`` (sorted ids): ``(classes, support, query)``.

    Without this, ids like ``[7, 3, 9]`` index prototypes that do not exist (easyfsl silently
    returns NaN prototypes then). Query ids absent from the support raise :class:`DataError`.
    """
    classes, support = torch.unique(support_labels, sorted=True, return_inverse=True)
    if query_labels is None:
        return classes, support, None
    query = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
    if not torch.equal(classes[query], query_labels):
        missing = sorted(set(query_labels.tolist()) - set(classes.tolist()))
        raise DataError(f"query labels {missing} have no support examples in this episode")
    return classes, support, query


def class_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """Mean embedding per class ``[n_classes, D]``; ``labels`` must be ``0..n_classes-1``.

    Also batched over episodes: ``[E, S, D]`` embeddings and ``[E, S]`` labels give ``[E, N, D]``.
    """
    # A one-hot matmul, not index_add_ (which took ~50 ms per call on this CPU build).
    onehot = F.one_hot(labels, n_classes).to(embeddings.dtype).transpose(-1, -2)  # [(E,) N, S]
    return (onehot @ embeddings) / onehot.sum(dim=-1, keepdim=True).clamp(min=1)


def prototype_logits(
    queries: torch.Tensor,
    prototypes: torch.Tensor,
    distance: str = "euclidean",
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """``[Q, N]`` logits: ``-||q - p||^2`` (euclidean) or ``scale * cos(q, p)`` (cosine).

    Also batched over episodes: ``[E, Q, D]`` queries and ``[E, N, D]`` prototypes give ``[E, Q, N]``.
    """
    if distance == "euclidean" and queries.ndim == 3:
        # Many episodes: the [E, Q, N, D] differences would not fit in cache (measured 4x slower
        # than episode by episode), so expand ||q||^2 - 2qp + ||p||^2 with one batched matmul,
        # in float64 so the cancellation stays far below float32 rounding (MPS has no float64).
        wide = torch.float32 if queries.device.type == "mps" else torch.float64
        q, p = queries.to(wide), prototypes.to(wide)
        sq = (
            q.pow(2).sum(-1, keepdim=True) - 2 * q @ p.transpose(-1, -2) + p.pow(2).sum(-1)[:, None]
        )
        return -sq.clamp(min=0).to(queries.dtype)
    if distance == "euclidean":
        # Exact differences, not ||q||^2 - 2qp + ||p||^2: no cancellation for nearby points.
        return -(queries[:, None, :] - prototypes[None, :, :]).pow(2).sum(dim=-1)
    if distance == "cosine":
        return (
            scale * F.normalize(queries, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2)
        )
    raise ValueError(f"unknown distance '{distance}'; valid: {list(DISTANCES)}")


class PrototypeClassifier:
    """Nearest-prototype classifier over an embedding: ``process_support_set``, then ``forward``.

    Args:
        embed: images ``[B, 3, H, W]`` -> embeddings ``[B, D]`` (a backbone, a model's ``embed``).
        distance: ``euclidean`` (logits = minus squared distance) or ``cosine``.
        scale: multiplies cosine logits (a learnable temperature may be passed).
        batch_size: support images embedded per forward.

    ``classes`` holds the support's class ids in the order of the logits' columns (sorted).

    Example:
        >>> clf = PrototypeClassifier(torch.nn.Identity())
        >>> clf.process_support_set(torch.tensor([[0.0, 0], [0, 2], [4, 0]]), torch.tensor([7, 7, 3]))
        >>> clf.classes.tolist(), clf(torch.tensor([[0.0, 0]])).tolist()
        ([3, 7], [[-16.0, -1.0]])
    """

    def __init__(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        distance: str = "euclidean",
        scale: torch.Tensor | float = 1.0,
        batch_size: int = 64,
    ):
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance '{distance}'; valid: {list(DISTANCES)}")
        self.embed, self.distance, self.scale, self.batch_size = embed, distance, scale, batch_size
        self.classes: torch.Tensor | None = None
        self.prototypes: torch.Tensor | None = None

    def process_support_set(
        self, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> None:
        """Embed the support images and keep one prototype (mean embedding) per class id."""
        embeddings = torch.cat([self.embed(x) for x in support_images.split(self.batch_size)])
        self.process_support_embeddings(embeddings, support_labels.to(embeddings.device))

    def process_support_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """As :meth:`process_support_set`, for support images already embedded ``[S, D]``."""
        self.classes, remapped, _ = remap_labels(labels)
        self.prototypes = class_prototypes(embeddings.float(), remapped, len(self.classes))

    def logits(self, query_embeddings: torch.Tensor) -> torch.Tensor:
        """``[Q, N]`` logits of embedded queries against the prototypes."""
        if self.prototypes is None:
            raise RuntimeError("call process_support_set(support_images, support_labels) first")
        return prototype_logits(
            query_embeddings.float(), self.prototypes, self.distance, self.scale
        )

    def forward(self, query_images: torch.Tensor) -> torch.Tensor:
        """``[Q, N]`` logits of the query images, columns in the order of :attr:`classes`."""
        return self.logits(self.embed(query_images))

    __call__ = forward  # a plain object, not an nn.Module: it must not own the model's weights
