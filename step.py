"""How the model learns, one step at a time: each --loss's objective (and the flags it reads), the optimizer of
each stage, the learning-rate schedule, and one step of adversarial training (attack, then update). train.py
runs these over the epochs, bench.py times train_step; `args` are train.py's flags.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from anchor import anchor_loss
from attacks import pgd

# Flags a loss does not read: typed with that loss, they are refused rather than silently ignored.
IGNORED = {"ce": ("temperature", "beta", "lam", "adv_view"), "trades": ("temperature", "beta", "adv_view"),
           "supcon": ("beta",)}


def unused_flag(loss, typed):
    """The first of the typed flags (dests) that --loss `loss` does not read, as "--name"; None if none."""
    return next((f"--{f.replace('_', '-')}" for f in IGNORED.get(loss, ()) if f in typed), None)


def make_optimizer(model, args, finetune):
    """SGD with Nesterov momentum over what the stage trains: everything, the projection head only where a
    contrastive loss uses it; fine-tuning trains the classifier alone (the rest, BatchNorm too, frozen).
    What is not trained gets requires_grad=False, so DDP expects no gradient for it."""
    uses_head = args.loss in ("anchor", "supcon") and args.lam > 0 and not finetune  # lam 0: the head stays as built
    for name, p in model.named_parameters():
        trained = not finetune and (uses_head or not name.startswith("head."))
        p.requires_grad_(name.startswith("classifier.") or trained)
    lr = args.finetune_lr if finetune else args.lr
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                          nesterov=True, weight_decay=args.wd)
    opt.finetune = finetune  # which stage this optimizer belongs to, saved with the checkpoint
    return opt


def lr_at(step, total, peak):
    """One-cycle: linear warm-up to the peak over the first 15% of steps, then cosine decay toward 0, which it
    would reach one step after the last (so the last step still updates)."""
    warm = max(1, int(0.15 * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step + 1 - warm) / (total + 1 - warm)))


@contextlib.contextmanager
def input_gradient_only(model):
    """The parameters' requires_grad off inside, restored after. The attack wants the input's gradient alone:
    eager autograd then skips the weight gradients, but a torch.compile'd backward computes the gradient of
    every input that requires one, so without this the compiled attack computes them all, and discards them."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, needed in saved:
            p.requires_grad_(needed)


def training_loss(net, x, x_adv, y, args, kind):
    """(total loss, [ce, second term], adversarial logits, clean logits or None) of loss `kind` for one batch."""
    if kind == "ce":
        logits_adv = net(x_adv)
        ce = F.cross_entropy(logits_adv.float(), y)
        return ce, [ce, torch.zeros_like(ce)], logits_adv, None
    if kind == "trades":
        # TRADES: CE on clean images + lam * KL(clean || adversarial) prediction; two passes, as in its
        # reference code, so BatchNorm sees clean and adversarial batches apart.
        logits_clean, logits_adv = net(x).float(), net(x_adv).float()
        ce = F.cross_entropy(logits_clean, y)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1), reduction="batchmean",
                      log_target=True)
        return ce + args.lam * kl, [ce, kl], logits_adv, logits_clean
    # anchor / supcon: one backbone pass over both views [augmented clean, adversarial].
    logits, z = net(torch.cat([x, x_adv]), projection=True)
    logits_clean, logits_adv = logits.float().chunk(2)
    ce = F.cross_entropy(logits_adv, y)
    views = torch.stack(z.chunk(2), dim=1)  # (B, 2, proj_dim)
    # distributed=True: under torchrun the contrast set is the global batch (a no-op in one process)
    beta = args.beta if kind == "anchor" else 0.0
    if args.lam == 0:  # the control: the same joint pass, CE alone; the term is logged, never differentiated
        with torch.no_grad():
            con = anchor_loss(views, y, args.temperature, beta, distributed=True)
        return ce, [ce, con], logits_adv, logits_clean
    con = anchor_loss(views, y, args.temperature, beta, distributed=True)
    return ce + args.lam * con, [ce, con], logits_adv, logits_clean


def train_step(model, net, opt, x, y, args, finetune=False, train_net=None, x_second=None):
    """One step of adversarial training: PGD examples against the model in eval mode, then one update of
    `opt` in train mode. `net` is the model or its torch.compile'd wrapper; `train_net` (default `net`) what
    the update calls (DDP's wrapper under torchrun). Fine-tuning (frozen backbone) trains the classifier with
    plain CE on PGD examples, whatever the first stage's loss. x_second (--adv-view second): a second
    augmentation of the images, which the adversarial view is made from instead of x."""
    kind = "ce" if finetune else args.loss
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        x_second = x_second.contiguous(memory_format=torch.channels_last) if x_second is not None else None
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.amp):
        model.eval()  # attack the model as it predicts (BatchNorm running statistics untouched)
        with input_gradient_only(model):
            attack_loss, start = "ce", True  # uniform random start in the eps-ball
            if kind == "trades":  # TRADES's code: ascend KL(clean || adversarial prediction) from x + 0.001 N(0, 1)
                with torch.no_grad():
                    clean_logp = F.log_softmax(net(x).float(), 1)
                attack_loss, start = lambda logits, y: F.kl_div(F.log_softmax(logits, 1), clean_logp,
                                                                reduction="none", log_target=True).sum(1), 0.001
            # x comes from batches(), in [0, 1] by construction: skip pgd's range check and its host sync
            source = x if x_second is None or finetune else x_second
            x_adv = pgd(net, source, y, args.eps, args.alpha, args.steps, random_start=start, loss=attack_loss,
                        check_range=False)
        model.train(not finetune)  # fine-tuning keeps the frozen backbone's BatchNorm in eval mode
        update_net = net if train_net is None else train_net
        loss, parts, logits_adv, logits_clean = training_loss(update_net, x, x_adv, y, args, kind)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, parts, logits_adv, logits_clean
