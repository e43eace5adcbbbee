"""MoCo: a query encoder, a momentum key encoder and a queue of keys (He et al., arXiv 1911.05722).

Follows facebookresearch/moco `moco/builder.py` (commit 7397dfe), with these changes: the queue takes
any K and batch size; the momentum update is one fused pass; Shuffle BN also works on a single device
(`bn_splits`), not only across DDP ranks; an optional symmetric loss (both views serve as query, as in the
reference CIFAR demo); and keys that are not finite are never enqueued, so one bad step cannot poison
the queue for the next K samples.

Under DDP every rank must start from the same queue: wrap with `DistributedDataParallel(model,
forward_sync_buffers=False)` (torch >= 2.14: buffers synced once at init, no per-step broadcast of the queue).
The older `broadcast_buffers=False` also skips the init sync, so ranks would start with different queues.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import batch_shuffle_ddp, batch_unshuffle_ddp, concat_all_gather, world_size
from .split_bn import split_batch_norms


def add_mlp_head(encoder: nn.Module) -> nn.Module:
    """MoCo v2's projection head, in place: the encoder's fc becomes Linear-ReLU-fc. Returns the encoder."""
    dim_mlp = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), encoder.fc)
    return encoder


class MoCo(nn.Module):
    """
    Build a MoCo model with: a query encoder, a key encoder, and a queue
    https://arxiv.org/abs/1911.05722
    """

    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.07, mlp: bool = False, bn_splits: int = 1,
                 symmetric: bool = False):
        """
        dim: feature dimension (default: 128)
        K: queue size; number of negative keys (default: 65536)
        m: moco momentum of updating key encoder (default: 0.999); a plain attribute, may change between steps
        T: softmax temperature (default: 0.07)
        mlp: MoCo v2 projection head, fc -> Linear-ReLU-fc (default: False)
        bn_splits: Shuffle BN on one device: BN statistics over this many sub-batches (default: 1, off)
        symmetric: also use im_k as query against im_q's key; logits hold both directions, 2N rows
        """
        super().__init__()
        if K < 1 or dim < 1:
            raise ValueError(f"MoCo needs K >= 1 and dim >= 1, got K={K}, dim={dim}")
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
        self.K = K
        self.m = m
        self.T = T
        self.dim = dim
        self.bn_splits = bn_splits
        self.symmetric = symmetric

        # create the encoders
        # num_classes is the output fc dimension
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)

        if mlp:  # hack: brute-force replacement
            add_mlp_head(self.encoder_q)
            add_mlp_head(self.encoder_k)

        if bn_splits > 1:  # BN statistics per sub-batch, as each GPU of a multi-GPU run would compute them
            split_batch_norms(self.encoder_q, bn_splits)
            split_batch_norms(self.encoder_k, bn_splits)

        # initialize the key encoder as a copy (parameters and BN statistics); not updated by gradient
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for param_k in self.encoder_k.parameters():
            param_k.requires_grad = False

        # create the queue
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """
        Momentum update of the key encoder: theta_k <- m * theta_k + (1 - m) * theta_q,
        as one fused pass over all parameters instead of a python loop.
        """
        params_q = list(self.encoder_q.parameters())
        params_k = list(self.encoder_k.parameters())
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor):
        """Write the keys of all ranks (rank order) over the oldest entries of the queue.

        Works for any K and batch size: the write wraps around the end of the queue, and a batch larger
        than K keeps its last K keys. Pointer arithmetic stays on the device, so there is no host sync.
        """
        # gather keys before updating queue
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        # a non-finite batch (the step will be skipped) leaves queue and pointer as they were; decided on
        # the device from the gathered keys, so every rank agrees without a host sync
        ok = torch.isfinite(keys).all()

        keep = min(batch_size, self.K)  # only the newest K keys survive a write larger than the queue
        start = self.queue_ptr + (batch_size - keep)
        idx = (start + torch.arange(keep, device=keys.device)) % self.K  # distinct, so the write is deterministic
        new = torch.where(ok, keys[batch_size - keep:].T.to(self.queue.dtype), self.queue[:, idx])
        self.queue.index_copy_(1, idx, new)

        self.queue_ptr.copy_((self.queue_ptr + batch_size * ok.long()) % self.K)  # move pointer

    @torch.no_grad()
    def _split_permutation(self, n: int, device: torch.device) -> torch.Tensor:
        """A random order of the n keys in which no key lands in its query's BN sub-batch.

        Sub-batch of position p is p % s (see SplitBatchNorm2d). Row r of the result (positions r*s .. r*s+s-1)
        takes one sample from every query sub-batch, sub-batch c(r, j) = (j + 1 + r mod (s-1)) mod s going to
        position j: never j itself, and round-robin over the others, so every key sub-batch mixes samples of
        all the other query sub-batches.
        """
        s, rows = self.bn_splits, n // self.bn_splits
        within = torch.rand(s, rows, device=device).argsort(dim=1)  # random order inside each query sub-batch
        r = torch.arange(rows, device=device)[:, None]
        j = torch.arange(s, device=device)[None, :]
        c = (j + 1 + r % (s - 1)) % s  # rows x s: the query sub-batch feeding each position
        return (within[c, r.expand(rows, s)] * s + c).reshape(-1)

    def _queries(self, im_q: torch.Tensor) -> torch.Tensor:
        q = self.encoder_q(im_q)  # queries: NxC
        return F.normalize(q, dim=1)

    @torch.no_grad()  # no gradient to keys
    def _keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys of a batch, with Shuffle BN: the key of a sample must not see the BN statistics its query saw."""
        n = im_k.shape[0]
        distributed = world_size() > 1
        if distributed:  # across ranks: shuffle the global batch, as in the reference
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k)
        if self.bn_splits > 1:  # within this device: reorder so key sub-batches mix query sub-batches
            idx_split = self._split_permutation(n, im_k.device)
            im_k = im_k[idx_split]

        k = self.encoder_k(im_k)  # keys: NxC
        k = F.normalize(k, dim=1)

        # undo shuffle
        if self.bn_splits > 1:
            k = k[torch.argsort(idx_split)]
        if distributed:
            k = batch_unshuffle_ddp(k, idx_unshuffle)
        return k

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # Einstein sum is more intuitive
        # positive logits: Nx1
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        # negative logits: NxK
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])

        # logits: Nx(1+K)
        logits = torch.cat([l_pos, l_neg], dim=1)

        # apply temperature
        return logits / self.T

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Input:
            im_q: a batch of query images
            im_k: a batch of key images
        Output:
            logits, targets (2N rows when symmetric: im_q's queries, then im_k's)
        """
        n = im_q.shape[0]
        if im_k.shape[0] != n:
            raise ValueError(f"im_q and im_k must hold the same number of images, got {n} and {im_k.shape[0]}")
        if n % self.bn_splits != 0:
            raise ValueError(f"bn_splits={self.bn_splits} must divide the per-device batch size, got {n} images")

        # compute query features
        q = self._queries(im_q)

        # compute key features, after the momentum update of the key encoder
        with torch.no_grad():
            self._momentum_update_key_encoder()
            k = self._keys(im_k)

        # compute logits
        logits = self._logits(q, k)
        keys = k
        if self.symmetric:  # the other direction: im_k as query, im_q's key as its positive
            q2 = self._queries(im_k)
            k2 = self._keys(im_q)
            logits = torch.cat([logits, self._logits(q2, k2)], dim=0)
            keys = torch.cat([k2, k], dim=0)

        # labels: positive key indicators
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)

        # dequeue and enqueue, after the logits: this batch's keys are never its own negatives
        self._dequeue_and_enqueue(keys)

        return logits, labels
