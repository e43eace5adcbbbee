"""Weighted kNN classification on frozen features, the monitor of the reference CIFAR demo (k 200, T 0.1):
each test feature votes with its k nearest training features (cosine similarity), weight exp(sim / T)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ViTFeatures(nn.Module):
    """A timm ViT without its head: the class token after the final norm, what the head would see."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)


def backbone_of(encoder: nn.Module) -> nn.Module:
    """The encoder without its projection head (`fc`, or the v2 MLP; a ViT's `head`, or the v3 projector): pooled
    features, what a user keeps. Shares the encoder's modules (no copy); torchvision ResNets list `fc` last among
    their children, timm ViTs `head`."""
    children = list(encoder.named_children())
    if children and children[-1][0] == "head" and hasattr(encoder, "forward_features"):
        return ViTFeatures(encoder)
    if not children or children[-1][0] != "fc":
        raise ValueError("backbone_of expects a torchvision-style ResNet whose last child is `fc`, or a timm ViT")
    return nn.Sequential(*(m for _, m in children[:-1]), nn.Flatten(1))


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """L2-normalised features of `images` (N,3,H,W float, already normalised), computed in eval mode;
    the network's train/eval mode is restored afterwards."""
    was_training = net.training
    net.eval()
    try:
        out = [F.normalize(net(images[i:i + batch_size].to(device)).float(), dim=1).cpu()
               for i in range(0, len(images), batch_size)]
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def knn_predict(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, classes: int,
                k: int = 200, t: float = 0.1) -> torch.Tensor:
    """Class scores (N, classes) of L2-normalised `features` against the labelled `bank` (M, D)."""
    sim = features @ bank.T  # cosine similarity, N x M
    k = min(k, bank.shape[0])
    sim_weight, sim_idx = sim.topk(k=k, dim=-1)
    sim_labels = bank_labels[sim_idx]  # N x k
    sim_weight = (sim_weight / t).exp()
    one_hot = torch.zeros(features.shape[0] * k, classes, device=features.device)
    one_hot.scatter_(1, sim_labels.reshape(-1, 1), 1.0)
    return (one_hot.view(features.shape[0], k, classes) * sim_weight.unsqueeze(-1)).sum(dim=1)


@torch.no_grad()
def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 200, t: float = 0.1, chunk: int = 1024) -> float:
    """Top-1 accuracy of the weighted kNN classifier, in chunks of test features to bound memory."""
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for i in range(0, len(test_features), chunk):
        scores = knn_predict(test_features[i:i + chunk], train_features, train_labels, classes, k, t)
        correct += int((scores.argmax(dim=1) == test_labels[i:i + chunk]).sum())
    return correct / max(1, len(test_features))
