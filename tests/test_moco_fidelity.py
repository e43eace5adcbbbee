"""MoCo against an independent, plain re-implementation of Algorithm 1 of the paper (arXiv 1911.05722),
plus the options around it: symmetric loss, schedules, numerical safety, queue state, kNN."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import TinyNet
from mocostream.moco_core import (MoCo, NonFiniteError, NonFiniteGuard, budget_lr, build_optimizer, cosine_lr, info_nce,
                       knn_top1, momentum_at, step_lr)
from mocostream.moco_core.knn import backbone_of, knn_predict


Tiny = TinyNet  # a small conv net with BN and an `fc`, like the ResNets MoCo wraps


class Algorithm1:
    """Algorithm 1 of the paper, line by line, with plain Python loops and no shared code with MoCo.

        f_k.params = f_q.params                      # initialize
        for x in loader:
            x_q, x_k = aug(x), aug(x)
            q = f_q.forward(x_q); k = f_k.forward(x_k).detach()     # (normalised, as in the code)
            l_pos = bmm(q.view(N,1,C), k.view(N,C,1)); l_neg = mm(q.view(N,C), queue.view(C,K))
            logits = cat([l_pos, l_neg], dim=1); labels = zeros(N)
            loss = CrossEntropyLoss(logits/t, labels)
            loss.backward(); update(f_q.params)
            f_k.params = m*f_k.params+(1-m)*f_q.params
            enqueue(queue, k); dequeue(queue)

    The momentum update at the end of iteration i is the one the reference code does at the start of
    iteration i+1, before the key forward; at the first iteration that update is the identity (f_k == f_q).
    """

    def __init__(self, f_q: nn.Module, queue: torch.Tensor, m: float, t: float, lr: float, symmetric=False):
        self.f_q = f_q
        self.f_k = copy.deepcopy(f_q)
        for p in self.f_k.parameters():
            p.requires_grad = False
        self.queue = queue.clone()  # C x K
        self.ptr = 0
        self.m, self.t, self.symmetric = m, t, symmetric
        self.opt = torch.optim.SGD(f_q.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def momentum_update(self):
        with torch.no_grad():
            for pq, pk in zip(self.f_q.parameters(), self.f_k.parameters()):
                pk.copy_(self.m * pk + (1 - self.m) * pq)

    def _contrast(self, x_q, x_k):
        q = F.normalize(self.f_q(x_q), dim=1)
        with torch.no_grad():
            k = F.normalize(self.f_k(x_k), dim=1).detach()
        n, c = q.shape
        l_pos = torch.bmm(q.view(n, 1, c), k.view(n, c, 1)).view(n, 1)
        l_neg = torch.mm(q.view(n, c), self.queue.view(c, -1))
        return torch.cat([l_pos, l_neg], dim=1) / self.t, k

    def step(self, x_q, x_k):
        self.momentum_update()  # (the end of the previous iteration)
        logits, k = self._contrast(x_q, x_k)
        keys = [k]
        if self.symmetric:
            logits2, k2 = self._contrast(x_k, x_q)
            logits = torch.cat([logits, logits2])
            keys = [k2, k]
        labels = torch.zeros(len(logits), dtype=torch.long)
        loss = F.cross_entropy(logits, labels) * (2 if self.symmetric else 1)
        self.opt.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in self.f_q.parameters()]
        self.opt.step()
        for key in torch.cat(keys):  # enqueue the newest, dequeue the oldest: a ring buffer
            self.queue[:, self.ptr] = key
            self.ptr = (self.ptr + 1) % self.queue.shape[1]
        return logits.detach(), loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_matches_algorithm_1_step_by_step(symmetric):
    torch.manual_seed(0)
    K, n, m, t, lr = 20, 6, 0.9, 0.2, 0.5  # K not a multiple of the batch: the queue wraps mid-batch
    model = MoCo(Tiny, dim=8, K=K, m=m, T=t, bn_splits=1, symmetric=symmetric)
    reference = Algorithm1(copy.deepcopy(model.encoder_q), model.queue, m, t, lr, symmetric)
    opt = build_optimizer(model, lr)

    # the key encoder starts as a copy of the query encoder; the queue as random unit vectors
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(K))

    for step in range(7):
        x_q, x_k = torch.randn(n, 3, 8, 8), torch.randn(n, 3, 8, 8)
        ref_logits, ref_loss, ref_grads = reference.step(x_q, x_k)

        logits, labels = model(x_q, x_k)
        loss = info_nce(logits, labels) * (2 if symmetric else 1)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in model.encoder_q.parameters()]
        opt.step()

        assert not labels.any() and len(labels) == n * (2 if symmetric else 1)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.queue, reference.queue, rtol=1e-5, atol=1e-6)
        assert int(model.queue_ptr) == reference.ptr, step
        for pk, rk in zip(model.encoder_k.parameters(), reference.f_k.parameters()):
            torch.testing.assert_close(pk, rk, rtol=1e-5, atol=1e-6)
        for pq, rq in zip(model.encoder_q.parameters(), reference.f_q.parameters()):
            torch.testing.assert_close(pq, rq, rtol=1e-5, atol=1e-6)
    assert reference.ptr == (7 * n * (2 if symmetric else 1)) % K


def test_queue_and_pointer_round_trip_through_the_state_dict():
    torch.manual_seed(0)
    model = MoCo(Tiny, dim=8, K=13)
    for _ in range(3):
        model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    restored = MoCo(Tiny, dim=8, K=13)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.queue, model.queue) and int(restored.queue_ptr) == 12
    x_q, x_k = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    a, _ = model(x_q, x_k)
    torch.manual_seed(1)
    b, _ = restored(x_q, x_k)
    assert torch.equal(a, b) and torch.equal(model.queue, restored.queue)


# ---------------------------------------------------------------------------------------------- numerical safety

def test_non_finite_step_is_skipped_on_the_device_and_counted():
    torch.manual_seed(0)
    model = MoCo(Tiny, dim=8, K=16, m=0.9)
    opt = build_optimizer(model, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(torch.device("cpu"), max_in_a_row=3)

    def step(x_q, x_k=None):
        logits, labels = model(x_q, torch.randn(4, 3, 8, 8) if x_k is None else x_k)
        loss = info_nce(logits, labels)
        opt.zero_grad()
        loss.backward()
        guard.before_step(opt, params)
        opt.step()
        return loss

    step(torch.randn(4, 3, 8, 8))
    before_q = [p.detach().clone() for p in model.encoder_q.parameters()]
    queue, ptr = model.queue.clone(), int(model.queue_ptr)
    bad = torch.randn(4, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(step(bad, bad.clone()))
    # the query encoder did not move, the queue took no NaN key and its pointer stayed
    assert all(torch.equal(a, b) for a, b in zip(before_q, model.encoder_q.parameters()))
    assert torch.equal(model.queue, queue) and int(model.queue_ptr) == ptr
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not math.isfinite(guard.grad_norm.item())
    # training goes on: a finite step moves the encoder again
    assert torch.isfinite(step(torch.randn(4, 3, 8, 8)))
    assert not all(torch.equal(a, b) for a, b in zip(before_q, model.encoder_q.parameters()))
    assert int(model.queue_ptr) == (ptr + 4) % 16
    assert guard.check() == 1  # counted, and one in a row is no reason to stop
    assert guard.check() == 0

    # a NaN query with finite keys: the gradient step is skipped, the (valid) keys still join the queue
    before_q = [p.detach().clone() for p in model.encoder_q.parameters()]
    step(bad)
    assert all(torch.equal(a, b) for a, b in zip(before_q, model.encoder_q.parameters()))
    assert torch.isfinite(model.queue).all() and int(model.queue_ptr) == (ptr + 8) % 16
    for _ in range(2):
        step(bad)
    with pytest.raises(NonFiniteError, match="3 training steps in a row"):
        guard.check()


def test_skipped_first_step_leaves_clean_optimizer_state():
    """Fused SGD allocates momentum buffers uninitialised on its first step; ours start at zero."""
    torch.manual_seed(0)
    net = Tiny()
    opt = build_optimizer(net, 0.1)
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in net.parameters())
    # and then the first real step equals plain SGD's first step
    ref = copy.deepcopy(net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p, q in zip(net.parameters(), ref.parameters()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    ref_opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# ---------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_clip_grad_bounds_the_true_gradient_and_reports_its_norm_before(precision):
    """--clip-grad: the step is lr x g x min(1, clip / ||g||), with g the true (for fp16: unscaled) gradient, and
    the guard reports ||g|| before clipping. A non-finite step is still skipped once and counted once."""
    from mocostream.ops.precision import StepPrecision

    cpu, lr = torch.device("cpu"), 0.5

    def one_step(clip: float, x: torch.Tensor):
        torch.manual_seed(0)
        net = nn.Linear(4, 3)
        w0 = net.weight.detach().clone()
        # the gradient without any of the code under test: plain autograd of the same loss
        twin = copy.deepcopy(net)
        with StepPrecision(precision, cpu).autocast():
            twin_loss = twin(x).float().pow(2).mean()
        g = torch.autograd.grad(twin_loss, [twin.weight, twin.bias])
        # the trainer's step: plain SGD (no momentum, no decay), so the update is lr x the gradient it used
        opt = build_optimizer(net, lr, momentum=0.0, weight_decay=0.0)
        amp, guard = StepPrecision(precision, cpu), NonFiniteGuard(cpu, 10, clip_norm=clip)
        with amp.autocast():
            loss = net(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        amp.backward_and_step(loss, opt, guard, list(net.parameters()))
        return (w0 - net.weight.detach()) / lr, g[0], torch.linalg.vector_norm(torch.cat([t.flatten() for t in g])), \
            guard

    x = torch.linspace(-2, 2, 32).reshape(8, 4)
    tol = dict(rtol=1e-5, atol=1e-7) if precision == "fp32" else dict(rtol=2e-3, atol=1e-5)
    used, g, norm, guard = one_step(0.0, x)  # off: the plain gradient step
    torch.testing.assert_close(used, g, **tol)
    assert norm > 1.0
    used, g, norm, guard = one_step(0.1, x)  # clipped to a tenth of a unit
    torch.testing.assert_close(guard.grad_norm, norm, **tol)  # the norm before clipping
    torch.testing.assert_close(used, g * 0.1 / norm, **tol)
    used, g, norm, guard = one_step(1e3, x)  # a bound above the norm changes nothing
    torch.testing.assert_close(used, g, **tol)
    # non-finite (NaN input; for fp16 also an overflow of the scaled gradient): skipped and counted once
    for bad in (torch.full((8, 4), float("nan")), torch.full((8, 4), 1e3)):
        used, _, _, guard = one_step(0.1, bad)
        if precision == "fp32" and torch.isfinite(bad).all():
            continue  # fp32 does not overflow here
        assert torch.count_nonzero(used) == 0 and guard.check() == 1


def test_step_lr_is_the_v1_schedule():
    assert step_lr(1.0, 0, 200) == 1.0 and step_lr(1.0, 119, 200) == 1.0
    assert step_lr(1.0, 120, 200) == pytest.approx(0.1) and step_lr(1.0, 160, 200) == pytest.approx(0.01)
    assert step_lr(1.0, 5, 200, warmup_steps=10) == pytest.approx(0.5)
    assert cosine_lr(1.0, 100, 200) == pytest.approx(0.5)


def test_momentum_schedule():
    assert momentum_at(0.99, 50, 100) == 0.99
    assert momentum_at(0.99, 0, 100, "cosine") == pytest.approx(0.99)
    assert momentum_at(0.99, 50, 100, "cosine") == pytest.approx(0.995)
    assert momentum_at(0.99, 100, 100, "cosine") == pytest.approx(1.0)
    values = [momentum_at(0.99, s, 100, "cosine") for s in range(101)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        momentum_at(0.99, 1, 10, "linear")


def test_budget_lr_follows_the_clock_like_the_step_schedules_follow_steps():
    """A time-boxed run: the same warmup in steps, then the decay at seconds trained / budget; without warmup
    it is the step schedule at the same fraction of the run."""
    assert budget_lr(2.0, "cosine", 5, 10, 0.9) == pytest.approx(1.0)  # warmup ignores the clock
    for progress in (0.0, 0.3, 0.5, 0.77, 1.0):
        assert budget_lr(1.0, "cosine", 10, 10, progress) == pytest.approx(cosine_lr(1.0, int(progress * 200), 200))
    assert budget_lr(1.0, "cosine", 99, 0, 1.5) == 0.0  # past the budget (the last step's overrun)
    assert [budget_lr(1.0, "step", 50, 0, p) for p in (0.59, 0.6, 0.79, 0.8)] == pytest.approx([1, 0.1, 0.1, 0.01])
    lrs = [budget_lr(1.0, "cosine", s, 0, s / 100) for s in range(101)]
    assert lrs == sorted(lrs, reverse=True)
    # momentum takes seconds and the budget in seconds as it takes steps and the step count
    assert momentum_at(0.99, 900.0, 1800.0, "cosine") == pytest.approx(0.995)


# ---------------------------------------------------------------------------------------------- kNN

def naive_knn(features, bank, labels, classes, k, t):
    out = []
    for f in features:
        sims = [(float(f @ b), int(lab)) for b, lab in zip(bank, labels)]
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * classes
        for sim, lab in sims[:k]:
            scores[lab] += math.exp(sim / t)
        out.append(scores)
    return torch.tensor(out)


def test_knn_predict_matches_the_definition():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(50, 5), dim=1)
    labels = torch.randint(0, 4, (50,))
    queries = F.normalize(torch.randn(7, 5), dim=1)
    got = knn_predict(queries, bank, labels, 4, k=10, t=0.1)
    torch.testing.assert_close(got, naive_knn(queries, bank, labels, 4, 10, 0.1), rtol=1e-4, atol=1e-4)


def test_knn_top1_on_separable_clusters():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(3, 16), dim=1) * 4
    def cloud(n):
        y = torch.arange(n) % 3
        return F.normalize(centres[y] + torch.randn(n, 16), dim=1), y
    bank, yb = cloud(300)
    test, yt = cloud(90)
    assert knn_top1(bank, yb, test, yt, k=20) > 0.95
    assert knn_top1(bank, yb[torch.randperm(300)], test, yt, k=20) < 0.6  # shuffled labels: chance level


def test_backbone_drops_the_projection_head_and_shares_weights():
    from mocostream.moco_core import build_encoder

    net = build_encoder("resnet18_cifar")(num_classes=16)
    net.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 16))
    backbone = backbone_of(net)
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert backbone[0] is net.conv1


@pytest.mark.slow
def test_compiled_encoders_match_and_keep_checkpoint_names():
    """--compile compiles the encoders in place: same results, same state-dict names (about 40 s on CPU)."""
    torch.manual_seed(0)
    model = MoCo(Tiny, dim=8, K=16, bn_splits=2)
    reference = MoCo(Tiny, dim=8, K=16, bn_splits=2)
    reference.load_state_dict(model.state_dict())
    model.encoder_q.compile()
    model.encoder_k.compile()
    assert list(model.state_dict()) == list(reference.state_dict())
    x_q, x_k = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.manual_seed(1)
    logits, labels = model(x_q, x_k)
    torch.manual_seed(1)
    expected, _ = reference(x_q, x_k)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    info_nce(logits, labels).backward()
    assert all(p.grad is not None for p in model.encoder_q.parameters())
