"""The ANCHOR loss: supervised contrastive learning that up-weights hard positives.

ANCHOR (Adversarially-trained Contrastive Hard-mining for Optimized Robustness, arXiv 2510.27599) trains a
classifier on adversarial examples and, beside the cross-entropy, pulls two views of each image, its augmented
version and the adversarial example made from it, together with each other and with their class (and apart
from other classes) in a projection space. This file holds the loss and, below it, two diagnostics that say how
far the loss has come (train.py logs them each epoch); it imports only torch and math, and `anchor_loss` can be
copied into another codebase as it is:

    feats = torch.stack([model_head(x_clean), model_head(x_adv)], dim=1)  # [B, 2, D]
    loss = ce + lam * anchor_loss(feats, labels, temperature=0.1, beta=1.0)

Under DistributedDataParallel (one process per GPU, each with its own sub-batch), pass distributed=True: every
rank then contrasts its embeddings with those of ALL ranks and returns the loss of the whole global batch, and
after DDP averages the gradients they equal the single-process gradients of that batch. Nothing else changes in
the DDP loop (`loss = ce + lam * anchor_loss(feats, labels, distributed=True); loss.backward()`); every rank
must call it at the same step, as for any collective.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' x concatenated in rank order along dim 0 (sizes[r] rows from rank r), with a gradient.

    torch.distributed.all_gather returns tensors without gradient. Here the backward hands each rank the SUM over
    ranks of the gradient w.r.t. its rows: every rank computes the same global loss, so that sum is world_size
    times the gradient of the loss, which DDP's averaging over ranks divides back out. (Keeping only the local
    rows' gradient, the usual fix, comes out world_size times too small.)
    """

    @staticmethod
    def forward(ctx, x, sizes):
        padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs equal shapes: pad, then trim
        padded[: len(x)] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.rows = sum(sizes[: dist.get_rank()]), len(x)  # where this rank's rows sit in the result
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks
        start, n = ctx.rows
        return grad[start : start + n], None


def _gather_global_batch(features, labels):
    """(features, labels) of all ranks, in rank order; each rank may hold a different number of images."""
    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(features)], device=features.device))
    sizes = [int(s) for s in sizes]
    return _GatherWithGrad.apply(features, sizes), _GatherWithGrad.apply(labels.to(features.device), sizes)


def anchor_loss(features, labels, temperature=0.1, beta=1.0, distributed=False):
    """Hard-positive-weighted supervised contrastive loss.

    features: float [B, V, D], V views of each of B images (L2-normalized here); labels: int [B].
    Over the N = B*V embeddings z, with positives P(i) = {p != i: y_p = y_i} and contrast set A(i) = {a != i}:
        L_i = -sum_{p in P(i)} q_ip * log( exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t) )
        q_ip = w_ip / sum_{p' in P(i)} w_ip',   w_ip = exp(beta * (1 - z_i.z_p)),   q computed without gradient
    and the loss is the mean of L_i over anchors with at least one positive (0, with a graph, if none has one).
    q_ip is (1/|P(i)|) times the weight w_ip normalized to mean 1: the least similar positives weigh most;
    beta = 0 gives q_ip = 1/|P(i)|, which is exactly SupCon's L_out (Khosla et al. 2020) with
    base_temperature = temperature. Returns a float32 scalar (float64 for float64 features).

    distributed=True under an initialized torch.distributed process group: features and labels of all ranks are
    gathered first (with gradient: _GatherWithGrad), so the sum above runs over the global batch; without a
    process group it is the same as False.
    """
    if features.dim() != 3 or not features.is_floating_point():
        raise ValueError(f"features must be a float tensor [B, V, D] (batch, views, dim), got "
                         f"{features.dtype} of shape {tuple(features.shape)}")
    B, V, D = features.shape
    if labels.shape != (B,):
        raise ValueError(f"labels must have shape [B] = [{B}] to match features, got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0 (0 gives SupCon), got {beta}")
    if distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        features, labels = _gather_global_batch(features, labels)
        B = features.shape[0]
    if B * V < 2:  # a single embedding has no positive and nothing to contrast with
        return features.sum() * 0.0

    # Similarities and log-softmax in float32 at least, even under bf16/fp16 autocast.
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = F.normalize(features.to(dtype).reshape(B * V, D), dim=1)  # (N, D), row b*V + v is view v of image b
        y = labels.to(features.device).repeat_interleave(V)  # (N,)
        sim = z @ z.T  # (N, N) cosine similarities in [-1, 1]
        self_mask = torch.eye(B * V, dtype=torch.bool, device=z.device)
        pos_mask = (y[:, None] == y[None, :]) & ~self_mask  # (N, N) P(i) in row i
        n_pos = pos_mask.sum(1)  # (N,)

        # log p(a | i) over the contrast set A(i); logsumexp subtracts the row max for stability.
        logits = sim / temperature
        log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(1, keepdim=True)  # (N, N)

        # Hard-positive weights: a softmax of -beta * sim over P(i) is w_ip / sum_p w_ip, computed stably.
        # Stop-gradient: the weights only say how much each pair counts, they are not optimized.
        with torch.no_grad():
            q = (-beta * sim).masked_fill(~pos_mask, float("-inf"))
            q = q.masked_fill((n_pos == 0)[:, None], 0.0).softmax(1)  # rows without positives: no -inf-only rows
            q = q * pos_mask  # (N, N), rows sum to 1 over P(i), or 0 where P(i) is empty

        per_anchor = -(q * log_prob.masked_fill(~pos_mask, 0.0)).sum(1)  # (N,)
        has_pos = (n_pos > 0).to(dtype)
        # Mean over anchors with a positive, without a host sync (no boolean indexing).
        return (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1.0)


# ---------------------------------------------------------------- diagnostics (not needed to train)


def feature_cosines(clean, adv, labels):
    """Mean cosines of feature vectors ([N, ...], flattened and normalized here), as floats: "twin", each image
    with its adversarial version; "intra", different images of one class; "inter", images of different classes
    (NaN where there is no such pair)."""
    a = F.normalize(clean.flatten(1).float(), dim=1)  # (N, D)
    b = F.normalize(adv.flatten(1).float(), dim=1)
    sim = a @ a.T  # (N, N)
    same = labels[:, None] == labels[None, :]
    others = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    mean = lambda mask: sim[mask].mean().item() if mask.any() else float("nan")
    return {"twin": (a * b).sum(1).mean().item(), "intra": mean(same & others), "inter": mean(~same)}


@torch.no_grad()
def loss_diagnostics(features, labels, temperature=0.1, beta=1.0):
    """How far anchor_loss has come on one batch of two views, features [B, 2, D] (view 0 clean, 1 adversarial).

    Floats: "loss"; its two reference values, "uniform" = log(N - 1) (every similarity equal: nothing learned)
    and "collapse" = the mean over anchors of log|P(i)| (its limit as each class shrinks to a point far from the
    others); "covered" = (uniform - loss) / (uniform - collapse), the fraction of that range the loss has come;
    "q_twin", the mean weight q of an anchor's other view (its adversarial twin, or clean original), against
    "inv_positives", the mean 1/|P(i)| that SupCon (beta 0) gives every positive; and the head's cosines
    ("twin", "intra", "inter" of feature_cosines)."""
    B, V, D = features.shape
    if V != 2:
        raise ValueError(f"features must hold two views [B, 2, D], got shape {tuple(features.shape)}")
    loss = anchor_loss(features, labels, temperature, beta).item()
    z = F.normalize(features.float().reshape(2 * B, D), dim=1)  # (N, D), row 2b + v is view v of image b
    y = labels.repeat_interleave(2)  # (N,)
    pos = (y[:, None] == y[None, :]) & ~torch.eye(2 * B, dtype=torch.bool, device=z.device)  # (N, N) P(i)
    q = (-beta * (z @ z.T)).masked_fill(~pos, float("-inf")).softmax(1)  # (N, N) anchor_loss's weights
    rows = torch.arange(2 * B, device=z.device)
    twin = rows ^ 1  # the other view of the same image: 2b <-> 2b + 1
    n_pos = pos.sum(1).float()  # (N,), >= 1: the twin is always a positive
    uniform, collapse = math.log(2 * B - 1), n_pos.log().mean().item()
    cos = feature_cosines(features[:, 0], features[:, 1], labels)
    return {"loss": loss, "uniform": uniform, "collapse": collapse,
            "covered": (uniform - loss) / (uniform - collapse) if uniform > collapse else float("nan"),
            "q_twin": q[rows, twin].mean().item(), "inv_positives": (1 / n_pos).mean().item(),
            **{f"head_{k}": v for k, v in cos.items()}}
