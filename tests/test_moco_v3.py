"""MoCo v3 against an independent, plain re-implementation of the paper's Algorithm 1 (arXiv 2104.02057), on
one process and on two (torchrun, gloo): gathered keys and rank-offset labels give the whole batch's loss.
The ViTs: sizes, fixed position embedding, initialisation, frozen patch projection."""
from __future__ import annotations

import copy
import inspect
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import REPO, TinyNet
from mocostream.moco_core import (LARS, MoCoV3, NonFiniteGuard, backbone_of, build_encoder, build_mlp, build_optimizer,
                                  is_vit, sincos_position_embedding, vit_base, vit_small, vit_tiny)
from mocostream.ops.ports import free_port


class TinyViTLike(nn.Module):
    """A small network shaped like a timm ViT where MoCo v3 touches it: LayerNorm (no BN) and a `head`."""

    def __init__(self, num_classes: int = 8):
        super().__init__()
        self.embed = nn.Linear(3 * 8 * 8, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        return self.head(self.norm(F.gelu(self.embed(x.flatten(1)))))


class Algorithm1:
    """Algorithm 1 of the MoCo v3 paper, with plain Python and no code shared with MoCoV3:

        f_k.params = f_q.params                      # the momentum encoder starts as a copy (no predictor)
        for x in loader:
            x1, x2 = aug(x), aug(x)
            q1, q2 = f_q(x1), f_q(x2)                # backbone + projector + predictor
            k1, k2 = f_k(x1), f_k(x2)                # backbone + projector, no gradient
            loss = ctr(q1, k2) + ctr(q2, k1)
            loss.backward(); update(f_q)
            f_k = m * f_k + (1 - m) * f_q
        def ctr(q, k):                               # q, k normalised, as in the code
            logits = mm(q, k.t()); labels = range(N)
            return 2 * tau * CrossEntropyLoss(logits / tau, labels)

    The code does the momentum update at the start of the next step, before the key forward, with that step's
    m; so does this. `shares` > 1 runs each view through the networks in that many equal parts (BN statistics
    per part, as on that many ranks without SyncBN) and contrasts the whole batch.
    """

    def __init__(self, encoder: nn.Module, predictor: nn.Module, tau: float, lr: float, shares: int = 1):
        self.encoder, self.predictor = encoder, predictor
        self.momentum = copy.deepcopy(encoder)
        self.tau, self.shares = tau, shares
        params = list(encoder.parameters()) + list(predictor.parameters())
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)

    def f_q(self, x):
        return torch.cat([self.predictor(self.encoder(part)) for part in x.chunk(self.shares)])

    def f_k(self, x):
        with torch.no_grad():
            return torch.cat([self.momentum(part) for part in x.chunk(self.shares)])

    def ctr(self, q, k):
        q = q / q.norm(dim=1, keepdim=True)
        k = k / k.norm(dim=1, keepdim=True)
        logits = q @ k.t()
        labels = torch.tensor(list(range(len(q))))
        return 2 * self.tau * F.cross_entropy(logits / self.tau, labels)

    def step(self, x1, x2, m):
        with torch.no_grad():
            for pk, pq in zip(self.momentum.parameters(), self.encoder.parameters()):
                pk.copy_(m * pk + (1 - m) * pq)
        q1, q2 = self.f_q(x1), self.f_q(x2)
        k1, k2 = self.f_k(x1), self.f_k(x2)
        loss = self.ctr(q1, k2) + self.ctr(q2, k1)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.detach()


def params_of(model: MoCoV3) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*model.base_encoder.parameters(), *model.predictor.parameters(),
                                        *model.momentum_encoder.parameters()]]


def reference_params(ref: Algorithm1) -> list[torch.Tensor]:
    return [p.detach().clone() for p in [*ref.encoder.parameters(), *ref.predictor.parameters(),
                                        *ref.momentum.parameters()]]


MOMENTA = (0.9, 0.95, 0.99, 1.0)  # rising, as the cosine schedule makes it


@pytest.fixture
def float64():
    """The fidelity tests run in float64: BN over a handful of samples amplifies float32 rounding ~5x per SGD
    step (1e-5 apart after 4 steps), while the same algorithm in float64 agrees to ~1e-14."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------------------------------- structure

def test_projector_and_predictor_are_the_references():
    """ResNet: 2-layer projector and predictor, the predictor without a last BN; ViT: 3-layer projector and a
    2-layer predictor with one. Linear layers without bias; the last BN of the projector without affine."""
    for net, vit in ((TinyNet, False), (TinyViTLike, True)):
        model = MoCoV3(net, dim=8, mlp_dim=16)
        head = "head" if vit else "fc"
        projector = getattr(model.base_encoder, head)
        kinds = [type(m).__name__ for m in projector]
        assert kinds == ["Linear", "BatchNorm1d", "ReLU"] * (2 if vit else 1) + ["Linear", "BatchNorm1d"]
        assert all(m.bias is None for m in projector if isinstance(m, nn.Linear))
        assert projector[0].in_features == (12 if vit else 8) and projector[-2].out_features == 8
        assert projector[-1].affine is False and projector[1].affine is True
        kinds = [type(m).__name__ for m in model.predictor]
        assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"] + (["BatchNorm1d"] if vit else [])
        assert model.predictor[0].in_features == 8 and model.predictor[0].out_features == 16
        # the momentum encoder: the same network with its own projector, a frozen copy; no predictor
        for pb, pm in zip(model.base_encoder.parameters(), model.momentum_encoder.parameters()):
            assert torch.equal(pb, pm) and pb is not pm and not pm.requires_grad and pb.requires_grad
        assert not hasattr(model.momentum_encoder, "predictor")
    assert [type(m).__name__ for m in build_mlp(1, 4, 16, 2, last_bn=False)] == ["Linear"]
    # the reference's signature and defaults; base_encoder(num_classes=mlp_dim) builds each backbone
    defaults = {n: p.default for n, p in inspect.signature(MoCoV3).parameters.items()}
    assert defaults == {"base_encoder": inspect.Parameter.empty, "dim": 256, "mlp_dim": 4096, "T": 1.0}
    built = []
    MoCoV3(lambda num_classes: built.append(num_classes) or TinyNet(num_classes), dim=8, mlp_dim=16)
    assert built == [16, 16]
    with pytest.raises(ValueError, match="fc.*head"):
        MoCoV3(lambda num_classes: nn.Conv2d(3, num_classes, 1))


def test_each_view_goes_through_the_encoders_as_its_own_batch():
    model = MoCoV3(TinyNet, dim=8, mlp_dim=16)
    sizes = []
    for net in (model.base_encoder, model.momentum_encoder):
        net.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    model(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8), 0.99)
    assert sizes == [6, 6, 6, 6]


# ---------------------------------------------------------------------------------------------- fidelity, one process

@pytest.mark.parametrize("net", [TinyNet, TinyViTLike])
def test_moco_v3_matches_algorithm_1_step_by_step(net, float64):
    torch.manual_seed(0)
    tau, lr, n = 0.2, 0.5, 6
    model = MoCoV3(net, dim=8, mlp_dim=16, T=tau)
    reference = Algorithm1(copy.deepcopy(model.base_encoder), copy.deepcopy(model.predictor), tau, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    for m in MOMENTA:
        x1, x2 = torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)
        ref_loss = reference.step(x1, x2, m)
        loss = model(x1, x2, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
        assert 0 <= float(model.accuracy) <= 1
    for ours, theirs in zip(params_of(model), reference_params(reference), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_loss_at_a_perfect_match_is_the_scaled_cross_entropy():
    """q . k = 1 for the positive and 0 for the negatives: ctr = 2T * CE(I / T), the formula without networks."""
    model = MoCoV3(TinyNet, dim=8, mlp_dim=16, T=0.5)
    q = torch.eye(4, 8)
    expected = 2 * 0.5 * -torch.log(torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 3))
    torch.testing.assert_close(model.contrastive_loss(q, q.clone()), expected)


# ---------------------------------------------------------------------------------------------- ViTs

def backbone_parameters(net: nn.Module) -> int:
    return sum(p.numel() for name, p in net.named_parameters() if not name.startswith("head."))


def test_vit_sizes_are_the_papers():
    """ViT-S/16 (384 wide, depth 12, 12 heads) and ViT-B/16 (768, 12, 12): the backbones' parameter counts."""
    small, base = vit_small(), vit_base()
    assert (small.embed_dim, len(small.blocks), small.blocks[0].attn.num_heads) == (384, 12, 12)
    assert (base.embed_dim, len(base.blocks), base.blocks[0].attn.num_heads) == (768, 12, 12)
    assert small.patch_embed.patch_size == base.patch_embed.patch_size == (16, 16)
    assert backbone_parameters(small) == pytest.approx(21.7e6, rel=2e-3)
    assert backbone_parameters(base) == pytest.approx(85.8e6, rel=2e-3)
    assert small.norm.eps == 1e-6 and small.blocks[0].attn.qkv.bias is not None


def test_vit_position_embedding_is_fixed_2d_sincos():
    torch.manual_seed(0)
    net = vit_tiny(img_size=32)  # 8 x 8 patches of 4 px, 192 wide
    pos = net.pos_embed
    assert pos.shape == (1, 1 + 64, 192) and not pos.requires_grad
    assert torch.equal(pos[0, 0], torch.zeros(192))  # the class token's entry
    omega = 10000.0 ** (-torch.arange(48) / 48)
    for row, col in ((0, 0), (2, 5), (7, 1)):
        a, b = row * omega, col * omega
        expected = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()])
        torch.testing.assert_close(pos[0, 1 + 8 * row + col], expected)
    torch.testing.assert_close(sincos_position_embedding((14, 14), 384), vit_small().pos_embed.detach())
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding((2, 2), 6)


def test_vit_initialisation_is_the_references():
    """xavier-uniform Linear layers (q, k, v each its own D x D matrix), zero biases, the patch projection
    xavier-uniform as a (3 p p) -> D map, class token N(0, 1e-6)."""
    torch.manual_seed(0)
    net = vit_small()
    d = 384
    qkv = net.blocks[3].attn.qkv.weight
    bound = math.sqrt(6 / (d + d))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound  # one third's bound, not (3D + D)'s
    fc1 = net.blocks[3].mlp.fc1.weight
    assert fc1.abs().max() <= math.sqrt(6 / (d + 4 * d)) and fc1.std() > 0.95 * math.sqrt(2 / (d + 4 * d))
    assert all(not m.bias.any() for m in net.modules() if isinstance(m, nn.Linear))
    proj = net.patch_embed.proj
    bound = math.sqrt(6 / (3 * 16 * 16 + d))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.99 * bound and not proj.bias.any()
    assert 0 < net.cls_token.std() < 2e-6


@pytest.mark.parametrize("stop_grad_conv1", [True, False])
def test_vit_frozen_parts_do_not_move_in_training(stop_grad_conv1):
    """The position embedding never trains; the patch projection only without stop_grad_conv1. The momentum
    encoder's copies move only by the rounding of m x + (1 - m) x (the reference's update, also over them)."""
    torch.manual_seed(0)
    model = MoCoV3(partial(vit_tiny, img_size=32, stop_grad_conv1=stop_grad_conv1), dim=16, mlp_dim=32, T=0.2)
    enc = model.base_encoder
    assert [type(m).__name__ for m in enc.head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert enc.patch_embed.proj.weight.requires_grad is not stop_grad_conv1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    for _ in range(2):
        loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), 0.9)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()

    def moved(name: str) -> bool:
        return not torch.allclose(after[name], before[name], rtol=0, atol=1e-6)

    assert torch.equal(after["base_encoder.pos_embed"], before["base_encoder.pos_embed"])
    for prefix in ("base_encoder.", "momentum_encoder."):
        assert not moved(prefix + "pos_embed")
        assert moved(prefix + "patch_embed.proj.weight") is not stop_grad_conv1
        assert moved(prefix + "blocks.0.attn.qkv.weight")


def test_vit_backbone_is_the_class_token_after_the_final_norm():
    torch.manual_seed(0)
    net = vit_tiny(img_size=32, num_classes=8)
    backbone = backbone_of(net).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = backbone(x)
        torch.testing.assert_close(feats, net.eval().forward_features(x)[:, 0])
    assert feats.shape == (2, 192) and backbone.vit is net
    assert build_encoder("vit_small", image_size=96)().patch_embed.grid_size == (6, 6)
    assert is_vit("vit_base") and not is_vit("resnet50")


# ---------------------------------------------------------------------------------------------- optimizers

def lars_by_the_formula(p: torch.Tensor, g: torch.Tensor, mu: torch.Tensor, lr: float, wd: float, momentum: float,
                        eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One LARS step written out in float64: for p.ndim > 1, u = g + wd p scaled by eta ||p|| / ||u||."""
    p, g, mu = p.double(), g.double(), mu.double()
    u = g
    if p.ndim > 1:
        u = g + wd * p
        pn, un = math.sqrt(float((p * p).sum())), math.sqrt(float((u * u).sum()))
        u = u * (eta * pn / un if pn > 0 and un > 0 else 1.0)
    mu = momentum * mu + u
    return p - lr * mu, mu


def test_lars_is_its_formula():
    """Weight decay and the trust ratio on matrices and kernels only; biases and norm gains plain momentum SGD;
    a zero-norm parameter or update keeps ratio 1."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(3, 2, 3, 3)), nn.Parameter(torch.randn(6)),
              nn.Parameter(torch.zeros(5, 5))]
    opt = LARS(params, lr=0.7, weight_decay=0.01, momentum=0.9, trust_coefficient=0.002)
    mus = [torch.zeros_like(p) for p in params]
    expected = [p.detach().clone() for p in params]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            expected[i], mus[i] = lars_by_the_formula(expected[i], g, mus[i], 0.7, 0.01, 0.9, 0.002)
            torch.testing.assert_close(params[i].detach().double(), expected[i], rtol=1e-5, atol=1e-6)
            expected[i], mus[i] = params[i].detach().clone(), mus[i].float()
    # the 1-D parameter took plain momentum SGD steps: its moves are lr * g sized, not eta-scaled
    assert not torch.allclose(params[2], torch.zeros(6))


@pytest.mark.parametrize("name", ["lars", "adamw", "sgd"])
def test_a_non_finite_step_is_skipped_by_every_optimizer_on_the_device(name):
    """The guard's found_inf flag: neither the weights nor the optimizer state move; the next step trains."""
    torch.manual_seed(0)
    model = MoCoV3(TinyNet, dim=8, mlp_dim=16)
    opt = build_optimizer(model, 0.1, weight_decay=0.01, name=name)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(torch.device("cpu"), max_in_a_row=3)

    def step(x):
        loss = model(x, torch.randn(4, 3, 8, 8), 0.99)
        opt.zero_grad()
        loss.backward()
        guard.before_step(opt, params)
        opt.step()

    step(torch.randn(4, 3, 8, 8))
    weights = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    bad = torch.randn(4, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    step(bad)
    assert all(torch.equal(a, b) for a, b in zip(weights, params))
    for i, s in opt.state_dict()["state"].items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[i][key])), (name, key)
    step(torch.randn(4, 3, 8, 8))
    assert not all(torch.equal(a, b) for a, b in zip(weights, params))
    assert guard.check() == 1
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, 0.1, name="adam")


def test_optimizers_leave_frozen_parameters_out():
    model = MoCoV3(partial(vit_tiny, img_size=32, stop_grad_conv1=True), dim=8, mlp_dim=16)
    for name in ("lars", "adamw"):
        opt = build_optimizer(model, 0.1, name=name)
        ids = {id(p) for group in opt.param_groups for p in group["params"]}
        frozen = [model.base_encoder.pos_embed, model.base_encoder.patch_embed.proj.weight,
                  *model.momentum_encoder.parameters()]
        assert not ids & {id(p) for p in frozen}
        assert id(model.predictor[0].weight) in ids and id(model.base_encoder.blocks[0].attn.qkv.weight) in ids


# ---------------------------------------------------------------------------------------------- two ranks

N_PER_RANK, STEPS = 4, 3


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: both views of 2 x N_PER_RANK images."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2 * N_PER_RANK, 3, 8, 8, generator=g), torch.randn(2 * N_PER_RANK, 3, 8, 8, generator=g)


def _ddp_worker(out_dir: str) -> None:
    """One rank under torchrun: this rank's share of every global batch, DDP over gloo."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float64)  # see the float64 fixture
    try:
        rank = dist.get_rank()
        torch.manual_seed(0)
        model = MoCoV3(TinyNet, dim=8, mlp_dim=16, T=0.2)
        ddp = DDP(model)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5, momentum=0.9,
                              weight_decay=1e-4)
        losses = []
        for step, m in enumerate(MOMENTA[:STEPS]):
            x1, x2 = (x[rank * N_PER_RANK:(rank + 1) * N_PER_RANK] for x in batches(step))
            loss = ddp(x1, x2, m)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.save({"losses": losses, "params": params_of(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_give_the_loss_and_weights_of_one_process_with_the_whole_batch(tmp_path, float64):
    """Each rank contrasts its N queries with the 2N gathered keys, positives at rank * N + i; DDP averages the
    ranks' gradients. So the mean of the ranks' losses is the whole batch's loss and the weights after each SGD
    step are the one-process weights (BN statistics per rank's share: SyncBatchNorm has no CPU kernel)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           str(Path(__file__)), "--worker", str(tmp_path)]
    r = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))

    torch.manual_seed(0)
    model = MoCoV3(TinyNet, dim=8, mlp_dim=16, T=0.2)
    reference = Algorithm1(model.base_encoder, model.predictor, 0.2, 0.5, shares=2)
    for step, m in enumerate(MOMENTA[:STEPS]):
        whole = reference.step(*batches(step), m)
        assert not torch.allclose(r0["losses"][step], r1["losses"][step])  # each rank its own queries
        torch.testing.assert_close((r0["losses"][step] + r1["losses"][step]) / 2, whole, rtol=1e-5, atol=1e-6)
    for p0, p1, ref in zip(r0["params"], r1["params"], reference_params(reference), strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-6)
        torch.testing.assert_close(p0, ref, rtol=0, atol=1e-5)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _ddp_worker(sys.argv[2])
