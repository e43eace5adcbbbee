"""moco_core: encoders, momentum update, queue, Shuffle BN (single device and real 2-rank DDP), loss, schedule."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import TinyNet
from mocostream.moco_core import (ARCHS, MoCo, add_mlp_head, build_encoder, build_optimizer, cosine_lr, info_nce,
                       instance_accuracy, scaled_lr)
from mocostream.moco_core.distributed import (batch_shuffle_ddp, batch_unshuffle_ddp, concat_all_gather, rank,
                                   world_size)
from mocostream.ops.ports import free_port


def images_with_ids(ids, size: int = 8, generator=None) -> torch.Tensor:
    """Random images whose pixel [0, 0, 0] holds the sample id, so a hook can tell which samples it saw."""
    x = torch.randn(len(ids), 3, size, size, generator=generator)
    x[:, 0, 0, 0] = torch.as_tensor(ids, dtype=x.dtype)
    return x


def ids_of(x: torch.Tensor) -> list[int]:
    return [int(v) for v in x[:, 0, 0, 0].round().tolist()]


def record_inputs(module: nn.Module) -> list[torch.Tensor]:
    """Every batch `module` is called with, in call order."""
    seen: list[torch.Tensor] = []
    module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    return seen


# ---------------------------------------------------------------------------------------------- encoders

@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet18_cifar", 32), ("resnet50_cifar", 32),
                                       ("resnet18_cifar_half", 32), ("resnet18_cifar_small", 32)])
def test_encoder_output_shape(arch, size):
    torch.manual_seed(0)
    net = build_encoder(arch)(num_classes=16).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, 16)
    assert torch.isfinite(out).all()


def test_resnet50_builds_with_2048_features():
    net = build_encoder("resnet50")(num_classes=128)
    assert net.fc.in_features == 2048 and net.fc.out_features == 128
    assert net.conv1.kernel_size == (7, 7)


def test_cifar_stem_keeps_resolution():
    std = build_encoder("resnet18")(num_classes=10)
    cifar = build_encoder("resnet18_cifar")(num_classes=10)
    assert std.conv1.kernel_size == (7, 7) and std.conv1.stride == (2, 2)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1) and cifar.conv1.padding == (1, 1)
    assert cifar.conv1.bias is None
    assert isinstance(cifar.maxpool, nn.Identity) and isinstance(std.maxpool, nn.MaxPool2d)
    # the stem really keeps 32x32: layer1 sees 32x32 in the cifar net, 8x8 in the ImageNet one
    shapes = {}
    for name, net in (("std", std), ("cifar", cifar)):
        net.layer1.register_forward_pre_hook(lambda _m, a, name=name: shapes.__setitem__(name, a[0].shape[-2:]))
        with torch.no_grad():
            net.eval()(torch.randn(1, 3, 32, 32))
    assert shapes == {"std": (8, 8), "cifar": (32, 32)}


def test_half_width_cifar_resnet():
    half = build_encoder("resnet18_cifar_half")(num_classes=10)
    full = build_encoder("resnet18_cifar")(num_classes=10)
    widths = [half.layer1[0].conv1.out_channels, half.layer4[1].conv2.out_channels, half.fc.in_features]
    assert widths == [32, 256, 256] and half.conv1.kernel_size == (3, 3) and isinstance(half.maxpool, nn.Identity)
    n_half, n_full = (sum(p.numel() for p in m.parameters()) for m in (half, full))
    assert 0.2 < n_half / n_full < 0.3  # a quarter of the weights (and of the compute)
    assert [n for n, _ in half.named_children()] == [n for n, _ in full.named_children()]


def test_small_cifar_resnet_pools_after_the_stem():
    small = build_encoder("resnet18_cifar_small")(num_classes=10)
    half = build_encoder("resnet18_cifar_half")(num_classes=10)
    assert isinstance(small.maxpool, nn.MaxPool2d) and small.maxpool.kernel_size == 2
    assert small.state_dict().keys() == half.state_dict().keys()  # same weights, only the grid differs
    shapes = []
    small.layer1.register_forward_pre_hook(lambda _m, a: shapes.append(a[0].shape[-2:]))
    small.layer4.register_forward_hook(lambda _m, _a, out: shapes.append(out.shape[-2:]))
    with torch.no_grad():
        small.eval()(torch.randn(1, 3, 32, 32))
    assert shapes == [(16, 16), (2, 2)]  # the ImageNet stem leaves 8x8 and 1x1


def test_unknown_arch_names_the_choices():
    with pytest.raises(ValueError) as e:
        build_encoder("vit_b16")
    for arch in ARCHS:
        assert arch in str(e.value)


# ---------------------------------------------------------------------------------------------- encoders in MoCo

def test_mlp_head_replaces_fc_on_both_encoders():
    model = MoCo(build_encoder("resnet50"), dim=128, K=16, mlp=True)
    for enc in (model.encoder_q, model.encoder_k):
        fc = enc.fc
        assert isinstance(fc, nn.Sequential) and isinstance(fc[1], nn.ReLU)
        assert (fc[0].in_features, fc[0].out_features) == (2048, 2048)
        assert (fc[2].in_features, fc[2].out_features) == (2048, 128)
    # evaluation rebuilds the query encoder with the same head: a checkpoint's weights load strictly
    encoder = add_mlp_head(build_encoder("resnet50")(num_classes=128))
    encoder.load_state_dict(model.encoder_q.state_dict())


def test_key_encoder_starts_as_copy_and_gets_no_grad():
    torch.manual_seed(0)
    model = MoCo(TinyNet, dim=8, K=16, mlp=True)
    sq, sk = model.encoder_q.state_dict(), model.encoder_k.state_dict()
    assert sq.keys() == sk.keys()
    for name in sq:
        assert torch.equal(sq[name], sk[name]), name
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    assert all(p.requires_grad for p in model.encoder_q.parameters())
    # they are copies, not shared tensors
    assert all(pq.data_ptr() != pk.data_ptr()
               for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()))

    logits, labels = model(torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8))
    info_nce(logits, labels).backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert all(p.grad is not None for p in model.encoder_q.parameters())

    opt = build_optimizer(model, lr=0.1)
    n_trainable = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_trainable == sum(p.numel() for p in model.encoder_q.parameters())
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4


def test_momentum_update_matches_naive_loop():
    torch.manual_seed(0)
    model = MoCo(TinyNet, dim=8, K=16, m=0.9)
    with torch.no_grad():  # an "optimizer step" on the query encoder so q != k
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    for m in (0.9, 0.5):  # m is a plain attribute a trainer can change between steps
        model.m = m
        expected = [m * pk.detach().clone() + (1 - m) * pq.detach()
                    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters())]
        model._momentum_update_key_encoder()
        for e, pk in zip(expected, model.encoder_k.parameters()):
            torch.testing.assert_close(pk, e, rtol=0, atol=1e-6)
        assert not any(torch.equal(e, pq) for e, pq in zip(expected, model.encoder_q.parameters()))


# ---------------------------------------------------------------------------------------------- queue

def naive_queue_write(queue: torch.Tensor, ptr: int, keys: torch.Tensor) -> int:
    """The obvious circular buffer: write key after key, wrapping at K."""
    for key in keys:
        queue[:, ptr] = key
        ptr = (ptr + 1) % queue.shape[1]
    return ptr


@pytest.mark.parametrize("K,batches", [(10, [4, 4, 4, 4, 4]), (10, [3, 7, 4, 25, 1]), (7, [13, 2]), (5, [5, 5])])
def test_queue_any_K_and_batch(K, batches):
    torch.manual_seed(0)
    model = MoCo(TinyNet, dim=4, K=K)
    for col in range(K):
        assert math.isclose(model.queue[:, col].norm().item(), 1.0, rel_tol=1e-5)
    naive, ptr = model.queue.clone(), 0
    history = []
    for b in batches:
        keys = F.normalize(torch.randn(b, 4), dim=1)
        history.extend(keys)
        model._dequeue_and_enqueue(keys)
        ptr = naive_queue_write(naive, ptr, keys)
        assert torch.equal(model.queue, naive)
        assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)
        assert model.queue_ptr.item() == ptr == len(history) % K
    # as a FIFO: once full, the queue holds exactly the newest K keys
    if len(history) >= K:
        newest = torch.stack(history[-K:])
        stored = model.queue.T
        assert all(any(torch.equal(s, n) for s in stored) for n in newest)


def test_queue_batch_larger_than_K_keeps_last_K():
    model = MoCo(TinyNet, dim=2, K=4)
    model._dequeue_and_enqueue(torch.ones(1, 2))  # ptr = 1
    keys = torch.arange(18, dtype=torch.float32).view(9, 2)  # 9 keys > K=4
    model._dequeue_and_enqueue(keys)
    # written key by key from ptr 1: positions 1,2,3,0,1,2,3,0,1 -> the last four keys (5..8) win
    assert model.queue_ptr.item() == (1 + 9) % 4
    assert sorted(model.queue[0].tolist()) == [10.0, 12.0, 14.0, 16.0]
    assert model.queue[:, 1].tolist() == [16.0, 17.0]  # key 8 landed where the pointer was before it


# ---------------------------------------------------------------------------------------------- forward

def test_forward_logits_and_labels():
    torch.manual_seed(0)
    model = MoCo(TinyNet, dim=8, K=12, T=0.2)
    queue_before = model.queue.clone()
    im_q, im_k = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    logits, labels = model(im_q, im_k)
    assert logits.shape == (6, 1 + 12)
    assert labels.dtype == torch.long and labels.shape == (6,) and not labels.any()

    q = F.normalize(model.encoder_q(im_q), dim=1)
    k = F.normalize(model.encoder_k(im_k), dim=1)  # key encoder is unchanged since its forward
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / 0.2)
    torch.testing.assert_close(logits[:, 1:], q @ queue_before / 0.2)  # negatives: the queue before this step

    # enqueue after logits: this step's keys went into the queue, but were not among its negatives
    torch.testing.assert_close(model.queue[:, :6], k.T)
    assert model.queue_ptr.item() == 6

    loss = info_nce(logits, labels)
    torch.testing.assert_close(loss, -F.log_softmax(logits, dim=1)[:, 0].mean())
    acc = instance_accuracy(logits)
    assert isinstance(acc, torch.Tensor) and acc.ndim == 0
    assert acc.item() == (logits.argmax(1) == 0).float().mean().item()


def test_momentum_update_happens_before_key_forward():
    torch.manual_seed(0)
    model = MoCo(TinyNet, dim=8, K=12, m=0.0)
    with torch.no_grad():  # a stale key encoder: if it were used for the keys, l_pos would differ
        for p in model.encoder_k.parameters():
            p.add_(torch.randn_like(p))
    im_q, im_k = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    logits, _ = model(im_q, im_k)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk)  # m = 0: the key encoder is now the query encoder
    q = F.normalize(model.encoder_q(im_q), dim=1)
    k = F.normalize(model.encoder_q(im_k), dim=1)
    torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / model.T)


def test_instance_accuracy_counts_rows_won_by_the_positive():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [1.0, 1.5, 0.5]])
    assert instance_accuracy(logits).item() == 0.5
    labels = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(info_nce(logits, labels), F.cross_entropy(logits, labels))


# ---------------------------------------------------------------------------------------------- Shuffle BN, one device

@pytest.mark.parametrize("splits", [2, 4])
def test_bn_splits_key_never_shares_its_query_sub_batch(splits):
    torch.manual_seed(0)
    n = 8
    model = MoCo(TinyNet, dim=8, K=32, m=0.9, bn_splits=splits)
    hooked_q, hooked_k = record_inputs(model.encoder_q), record_inputs(model.encoder_k)
    for step in range(3):
        ids = list(range(100 * step, 100 * step + n))
        im_q, im_k = images_with_ids(ids), images_with_ids(ids)
        hooked_q.clear(), hooked_k.clear()
        logits, _ = model(im_q, im_k)
        seen_q, seen_k = hooked_q[0], hooked_k[0]  # one forward per encoder: BN splits the batch itself
        assert len(hooked_q) == len(hooked_k) == 1

        # BN sub-batch of a sample = its position % splits; the key of every sample sits in another one
        q_group = {i: pos % splits for pos, i in enumerate(ids_of(seen_q))}
        k_group = {i: pos % splits for pos, i in enumerate(ids_of(seen_k))}
        assert sorted(k_group) == ids  # every key computed exactly once
        for i in ids:
            assert k_group[i] != q_group[i], f"sample {i}: key normalised with its query's sub-batch"
        # and each key sub-batch mixes samples of other query sub-batches, not one other sub-batch
        if splits > 2:
            for g in range(splits):
                sources = {q_group[i] for i in ids if k_group[i] == g}
                assert len(sources) == min(splits - 1, n // splits)

        # the keys went back to their samples: recompute them and compare l_pos
        with torch.no_grad():
            q = F.normalize(model.encoder_q(im_q), dim=1)
            k_perm = F.normalize(model.encoder_k(seen_k), dim=1)
            k = torch.stack([k_perm[ids_of(seen_k).index(i)] for i in ids])
            for m in model.encoder_q.modules():  # the same batch with ordinary, whole-batch BN
                if hasattr(m, "splits"):
                    m.splits = 1
            full_batch_q = F.normalize(model.encoder_q(im_q), dim=1)
            for m in model.encoder_q.modules():
                if hasattr(m, "splits"):
                    m.splits = splits
        torch.testing.assert_close(logits[:, 0], (q * k).sum(1) / model.T)
        assert not torch.allclose(q, full_batch_q, atol=1e-4)  # the split really changed BN statistics
        torch.testing.assert_close(model.queue[:, (n * step) % 32:(n * step) % 32 + n], k.T)


def test_split_batch_norm_equals_bn_per_interleaved_sub_batch():
    from mocostream.moco_core.split_bn import SplitBatchNorm2d, split_batch_norms

    torch.manual_seed(0)
    splits, n, c = 4, 12, 5
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    split = split_batch_norms(nn.Sequential(copy.deepcopy(bn)), splits)[0]
    assert isinstance(split, SplitBatchNorm2d) and split.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(n, c, 3, 3) * 3 + 1
    out = split(x)
    singles = [copy.deepcopy(bn) for _ in range(splits)]
    for g in range(splits):  # sample i belongs to sub-batch i % splits
        torch.testing.assert_close(out[g::splits], singles[g](x[g::splits]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.running_mean, torch.stack([b.running_mean for b in singles]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([b.running_var for b in singles]).mean(0))
    split.eval(), bn.eval()
    torch.testing.assert_close(split(x), nn.BatchNorm2d.forward(split, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_batch_norm_in_channels_last_memory_matches_the_nchw_path(dtype):
    """bf16 + channels_last (CPU AMX, GPU) takes the NHWC kernel: same outputs, gradients and running stats."""
    from mocostream.moco_core.split_bn import SplitBatchNorm2d

    torch.manual_seed(0)
    nchw, nhwc = SplitBatchNorm2d(6, 4), SplitBatchNorm2d(6, 4)
    with torch.no_grad():
        nchw.weight.uniform_(0.5, 2), nchw.bias.uniform_(-1, 1)
    nhwc.load_state_dict(nchw.state_dict())
    x = (torch.randn(16, 6, 5, 7) * 3 + 1)
    x[:, 2] = x[:, 2] / 3 + 40  # a channel whose mean is large next to its spread
    x = x.to(dtype)
    x_ref = x.float().clone().requires_grad_()
    x_cl = x.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
    y_ref, y_cl = nchw(x_ref), nhwc(x_cl)
    assert y_cl.dtype == dtype and y_cl.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y_ref)
    (y_ref * grad).sum().backward()
    (y_cl.float() * grad).sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y_cl.float(), y_ref, **tol)
    torch.testing.assert_close(x_cl.grad.float(), x_ref.grad, **tol)
    scale = {"rtol": tol["rtol"], "atol": tol["atol"] * 40}  # sums over 140 elements of rounded dy * xhat
    torch.testing.assert_close(nhwc.weight.grad, nchw.weight.grad, **scale)
    torch.testing.assert_close(nhwc.bias.grad, nchw.bias.grad, **scale)
    torch.testing.assert_close(nhwc.running_mean, nchw.running_mean, **tol)
    torch.testing.assert_close(nhwc.running_var, nchw.running_var, **tol)
    assert nhwc.num_batches_tracked == nchw.num_batches_tracked == 1


def test_bn_splits_must_divide_batch():
    model = MoCo(TinyNet, dim=8, K=16, bn_splits=4)
    with pytest.raises(ValueError, match="bn_splits=4 must divide"):
        model(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
    with pytest.raises(ValueError):
        MoCo(TinyNet, dim=8, K=16, bn_splits=0)


def test_single_process_collectives_are_identity():
    assert world_size() == 1 and rank() == 0
    x = torch.randn(5, 3)
    assert torch.equal(concat_all_gather(x), x)
    xs, idx_unshuffle = batch_shuffle_ddp(x)
    assert torch.equal(batch_unshuffle_ddp(xs, idx_unshuffle), x)
    assert torch.equal(xs, x[torch.argsort(idx_unshuffle)])


# ---------------------------------------------------------------------------------------------- real DDP, 2 ranks

def _ddp_worker(rank_: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank_, world_size=world)
    try:
        torch.manual_seed(rank_)  # different initial weights and queue per rank: DDP must make them agree
        n, K = 4, 24
        model = MoCo(TinyNet, dim=8, K=K, m=0.9, T=0.1, mlp=True, bn_splits=2)
        # no per-step buffer broadcast (the queue is K x dim), but buffers synced once at init. In torch 2.14
        # `broadcast_buffers=False` is deprecated and also skips that init sync (queues would start per rank).
        ddp = DDP(model, forward_sync_buffers=False)
        opt = build_optimizer(ddp, lr=0.5)
        key_inputs, key_outputs = [], []

        def record_key_forward(_m, args, out):  # returns None: the output is left as it is
            key_inputs.append(args[0].clone())
            key_outputs.append(out.detach().clone())

        model.encoder_k.register_forward_hook(record_key_forward)

        gen = torch.Generator().manual_seed(1000 + rank_)  # different data per rank
        steps = []
        for step in range(2):
            ids = [1000 * step + 100 * rank_ + i for i in range(n)]
            im_q, im_k = images_with_ids(ids, generator=gen), images_with_ids(ids, generator=gen)
            key_inputs.clear(), key_outputs.clear()
            logits, labels = ddp(im_q, im_k)
            loss = info_nce(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            # this rank's key encoder saw these samples (after the cross-rank shuffle)
            steps.append({"ids": ids, "key_in": torch.cat(key_inputs), "key_out": torch.cat(key_outputs),
                          "loss": loss.detach()})

        x = torch.arange(6 * 2, dtype=torch.float32).view(6, 2) + 100 * rank_
        xs, idx_unshuffle = batch_shuffle_ddp(x)
        roundtrip = batch_unshuffle_ddp(xs, idx_unshuffle)
        result = {
            "world": world_size(), "rank": rank(), "steps": steps,
            "queue": model.queue.clone(), "queue_ptr": model.queue_ptr.clone(),
            "encoder_q": copy.deepcopy(model.encoder_q.state_dict()),
            "encoder_k_params": [p.detach().clone() for p in model.encoder_k.parameters()],
            "x": x, "xs": xs, "roundtrip": roundtrip, "idx_unshuffle": idx_unshuffle,
            "x_gather": concat_all_gather(x), "xs_gather": concat_all_gather(xs),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank_}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["world"], r0["rank"], r1["world"], r1["rank"]) == (2, 0, 2, 1)

    # both ranks end with the same queue and encoders
    assert torch.equal(r0["queue"], r1["queue"])
    assert r0["queue_ptr"].item() == r1["queue_ptr"].item() == (2 * 2 * 4) % 24
    for name in r0["encoder_q"]:
        if "running" not in name and "num_batches" not in name:  # BN statistics are per rank (no SyncBN)
            torch.testing.assert_close(r0["encoder_q"][name], r1["encoder_q"][name], rtol=0, atol=1e-6)
    for p0, p1 in zip(r0["encoder_k_params"], r1["encoder_k_params"]):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-6)

    for step in range(2):
        s0, s1 = r0["steps"][step], r1["steps"][step]
        # Shuffle BN across ranks: the key encoders together saw every sample once, not each rank its own
        seen = ids_of(torch.cat([s0["key_in"], s1["key_in"]]))
        assert sorted(seen) == sorted(s0["ids"] + s1["ids"])
        assert sorted(ids_of(s0["key_in"])) != sorted(s0["ids"])
        # the queue holds the keys of both ranks in rank order (rank 0 first), unshuffled to their samples
        key_of = {}
        for s in (s0, s1):
            for i, out in zip(ids_of(s["key_in"]), F.normalize(s["key_out"], dim=1)):
                key_of[i] = out
        expected = torch.stack([key_of[i] for i in s0["ids"] + s1["ids"]])
        torch.testing.assert_close(r0["queue"][:, 8 * step:8 * step + 8], expected.T)
        assert torch.isfinite(s0["loss"]) and torch.isfinite(s1["loss"])

    # batch_shuffle_ddp / batch_unshuffle_ddp round-trip, with one permutation shared by both ranks
    for r in (r0, r1):
        assert torch.equal(r["roundtrip"], r["x"])
    assert torch.equal(r0["idx_unshuffle"], r1["idx_unshuffle"])
    x_all = r0["x_gather"]
    assert torch.equal(r0["xs_gather"], x_all[torch.argsort(r0["idx_unshuffle"])])
    assert torch.equal(r0["xs_gather"][r0["idx_unshuffle"]], x_all)
    assert not torch.equal(r0["xs_gather"], x_all)


# ---------------------------------------------------------------------------------------------- schedule

def test_scaled_lr():
    assert scaled_lr(0.03, 256) == pytest.approx(0.03)
    assert scaled_lr(0.03, 1024) == pytest.approx(0.12)
    assert scaled_lr(0.03, 64) == pytest.approx(0.0075)


def test_cosine_lr_endpoints_and_warmup():
    assert cosine_lr(1.0, 0, 100) == pytest.approx(1.0)
    assert cosine_lr(1.0, 50, 100) == pytest.approx(0.5)
    assert cosine_lr(1.0, 100, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_lr(1.0, 500, 100) == pytest.approx(0.0, abs=1e-12)  # a stream running past its plan
    # reference --cos per epoch: lr * 0.5 * (1 + cos(pi * epoch / epochs))
    assert cosine_lr(0.03, 30, 200) == pytest.approx(0.03 * 0.5 * (1 + math.cos(math.pi * 30 / 200)))
    # warmup: linear from 0 to peak, then the cosine over the remaining steps
    assert cosine_lr(2.0, 0, 110, warmup_steps=10) == 0.0
    assert cosine_lr(2.0, 5, 110, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(2.0, 10, 110, warmup_steps=10) == pytest.approx(2.0)
    assert cosine_lr(2.0, 60, 110, warmup_steps=10) == pytest.approx(1.0)
    assert cosine_lr(2.0, 110, 110, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    lrs = [cosine_lr(1.0, s, 50, warmup_steps=5) for s in range(51)]
    assert lrs[:6] == sorted(lrs[:6]) and lrs[5:] == sorted(lrs[5:], reverse=True)
    with pytest.raises(ValueError):
        cosine_lr(1.0, 0, 10, warmup_steps=11)
