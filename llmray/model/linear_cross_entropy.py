"""The LM head and its cross-entropy fused in chunks of tokens: the full (tokens × vocab) logits never exist.

Why: the plain path materializes fp32 logits, their log-softmax and its gradient, three
(tokens × vocab) tensors: at 8,192 tokens and Llama 3's 128,256-token vocabulary that is 4.2 GB
each, more than the rest of an 8B model's activations on that rank. Here the head runs on
``chunk_tokens`` tokens at a time, and the gradient of the summed loss with respect to the hidden
states and the head's weight is computed in the same pass (Liger-Kernel's fused linear
cross-entropy): peak memory is one chunk of logits, and the (tokens × vocab) elementwise work
stays in cache instead of streaming three tensors through memory. Computing gradients in the
forward is exact because the result is a scalar: whatever the caller does with it, autograd hands
back one number to scale them by.

The head's GEMMs run in the autocast dtype when autocast is on (bf16 compute, as ``nn.Linear``
would), the softmax, the log-sum-exp and the accumulated weight gradient in fp32. Under
``torch.no_grad`` only the loss is computed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_TOKENS = 256


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """The reference the fused path equals: summed fp32 nats of the non-ignored targets, plus PaLM's
    ``z_loss · logsumexp(logits)²`` per counted token. logits (..., V), targets (...)."""
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss:
        total = total + z_loss * (logits.logsumexp(dim=-1).square() * (targets != IGNORE_INDEX)).sum()
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
                         chunk_tokens: int = CHUNK_TOKENS, vocab_group: dist.ProcessGroup | None = None,
                         vocab_offset: int = 0) -> torch.Tensor:
    """``cross_entropy_sum(hidden @ weight.T, targets, z_loss)`` without the full logits.

    hidden (..., D), weight (V, D), targets (...) with :data:`IGNORE_INDEX` where not counted.
    Vocabulary-parallel (tensor parallelism's head): ``weight`` is this rank's rows
    ``vocab_offset …`` of the head and ``vocab_group`` the ranks holding the others; the
    log-sum-exp, the target's logit and the hidden states' gradient are all-reduced over it (three
    vectors and one chunk × D per chunk), so no rank ever holds more than its share of the logits.
    """
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if not torch.is_grad_enabled():  # needs_input_grad would not know: no gradients to compute
        hidden, weight = hidden.detach(), weight.detach()
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden.flatten(0, -2), weight, targets.flatten(), float(z_loss),
                                         int(chunk_tokens), compute_dtype, vocab_group, int(vocab_offset))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, z_loss, chunk_tokens, compute_dtype, group, offset):
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens].to(compute_dtype)
            t = targets[start:start + chunk_tokens]
            counted = t != IGNORE_INDEX
            local = t - offset
            mine = counted & (local >= 0) & (local < weight.shape[0])  # targets in this rank's rows
            safe = torch.where(mine, local, 0)[:, None]
            log_probs, lse = _log_softmax((h @ w.T).float(), group, need_lse=bool(z_loss))  # (chunk, V)
            picked = log_probs.gather(1, safe).squeeze(1) * mine
            total -= _summed(picked, group).sum()
            if z_loss:
                total += z_loss * (lse.square() * counted).sum()
            if not (want_hidden or want_weight):
                continue
            # d/dlogits of nats + z·lse² = softmax · (1 + 2z·lse) - onehot(target), on counted tokens
            grad = log_probs.exp_()
            grad.mul_((counted * (1 + 2 * z_loss * lse) if z_loss else counted)[:, None])
            grad.scatter_add_(1, safe, -mine.to(grad.dtype)[:, None])
            grad = grad.to(compute_dtype)
            if want_hidden:
                grad_hidden[start:start + chunk_tokens] = _summed(grad @ w, group)
            if want_weight and grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.T, h)  # no weight-sized temporary per chunk
            elif want_weight:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        """Scales the saved gradients in place (they are this forward's alone, used once): a copy
        would hold a second weight-sized gradient while the weight is gathered, the peak of a
        ZeRO-3 rank."""
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _log_softmax(logits: torch.Tensor, group, need_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities over the whole vocabulary (in place where sharded) and, if asked, the log-sum-exp."""
    if group is None:
        log_probs = logits.log_softmax(dim=-1)
        return log_probs, (logits[:, 0] - log_probs[:, 0] if need_lse else None)
    peak = logits.amax(dim=-1)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    sum_exp = _summed((logits - peak[:, None]).exp_().sum(dim=-1), group)
    lse = peak + sum_exp.log()
    return logits.sub_(lse[:, None]), lse


def _summed(tensor: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor
