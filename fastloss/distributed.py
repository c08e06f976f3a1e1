r"""Vocab-parallel cross-entropy over a :mod:`torch.distributed` process group.

In each of the P processes of a group (``torch.distributed`` initialized)::

    import fastloss.distributed as fld
    loss = fld.cross_entropy(logits_shard, target, class_offset=rank * C, num_classes=P * C)
    loss.backward()   # logits_shard.grad: exactly this rank's slice of the unsharded gradient

Each rank of the group holds the logits of a contiguous block of classes -- the output of a
vocab-parallel (column-parallel) final layer -- and the *whole* target and class weight. The
loss every rank gets back is the unsharded ``torch.nn.functional.cross_entropy`` (with
fastloss's options), and ``backward()`` gives each rank exactly its columns of the unsharded
gradient. The N x V logits are never gathered: the ranks exchange N numbers each.

How it works
------------
With rank :math:`r` holding the classes :math:`[o_r, o_r + C_r)` of :math:`K`, and
:math:`x'` the (capped) logits:

1. each rank forms the log-sum-exp of its own classes,
   :math:`\operatorname{lse}_r = \log \sum_{c \in r} e^{x'_c}` (float64, from the
   cross-entropy kernel's own max-shifted pass; :math:`-\infty` for a row whose shard is all
   :math:`-\infty`);
2. **one all-gather** of these N values (plus a few numbers that check the call, see below)
   gives every rank the global :math:`\operatorname{lse} = \log \sum_r e^{\operatorname{lse}_r}`
   (:func:`fastloss.logsumexp` over the ranks, exact for :math:`-\infty` shards);
3. each rank runs the sharded kernel (:func:`fastloss.cross_entropy` with ``lse=``,
   ``class_offset=``, ``num_classes=``): one pass over its shard gives its additive share of the
   row loss,

   .. math::

       s_r = [o_r = 0]\,\bigl(((1-\varepsilon) w_t + \tfrac{\varepsilon}{K}\textstyle\sum_k w_k)
             \operatorname{lse} + z \operatorname{lse}^2\bigr)
             - [t \in r]\,(1-\varepsilon) w_t x'_t
             - \tfrac{\varepsilon}{K} \textstyle\sum_{c \in r} w_c x'_c

   (0 for an ignored row), and exactly its slice of the unsharded gradient,
   :math:`p_c A - \tfrac{\varepsilon}{K} w_c - [c = t](1-\varepsilon) w_t` (times
   :math:`1 - \tanh^2(x_c/s)` under a softcap :math:`s`) with
   :math:`p_c = e^{x'_c - \operatorname{lse}}` and
   :math:`A = (1-\varepsilon) w_t + \tfrac{\varepsilon}{K}\sum_k w_k + 2 z \operatorname{lse}`;
4. **one all-reduce** (sum) of the shares -- the reduced share, or with ``reduction="none"``
   the N row shares, in float64 -- gives every rank the unsharded loss
   :math:`\sum_r s_r`. ``"mean"`` divides by the global denominator
   :math:`\sum_{i \text{ kept}} w_{t_i}` (or ``num_items``), which every rank forms itself: it
   has the whole target and weight.

The backward needs no communication: the loss is replicated, every rank backpropagates its
own copy with the same upstream gradient, and the gradient of its shard was formed in the
forward pass (autograd as in :mod:`fastloss.torch`: the backward only scales the saved
gradient by the upstream one).

Checks. Arguments are judged on every rank before anything is computed, and the all-gather
carries, next to the N lse values, each rank's verdict, its ``(class_offset, C_local)``, its
``num_classes`` and options and fingerprints of its ``target`` and ``weight``. So a call that
is wrong on one rank raises on *every* rank (no rank is left waiting in the all-reduce): the
rank with the bad argument raises its own error, the others a ``ValueError`` naming it; and
shards that do not tile ``[0, num_classes)`` exactly, or ranks that disagree on the target,
the weight or an option, raise a ``ValueError`` on every rank. No extra collective is spent on
this. What cannot be checked without one: the row count must be the same on every rank (the
all-gather exchanges N values per rank; gloo aborts the process on mismatched sizes).

Devices. CPU tensors run on a ``gloo`` group, on the host backends (zero-copy). CUDA tensors
run on an ``nccl`` group, on fastloss's ``cuda`` backend (where it is installed), the gathered
lse values staying on the device. Eager mode: under ``torch.compile`` the collectives cause a
graph break around the call.

Probability targets are not accepted: a soft target's share needs the global weighted target
mass, one more all-reduce (``ValueError``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import _api as _fl
from ._api.cross_entropy import _options, _shard, row_lse
from ._validate import check_int
from .torch import (
    _arr,
    _check_args,
    _class_dim,
    _lse_dtype,
    _need_grad,
    _not_differentiable,
    _scaled,
    _tensor,
    once_differentiable,
)

__all__ = ["cross_entropy"]

# the numbers each rank appends to its N lse values in the all-gather (float64; integers below
# 2**52 are exact there): its verdict on its own arguments, its shard, and what must agree
_OK, _OFFSET, _WIDTH, _K, _TARGET, _WEIGHT, _IGNORE, _EPS, _Z, _CAP, _NITEMS, _RED = range(12)
_META = 12
_REDUCTIONS = {"mean": 0.0, "sum": 1.0, "none": 2.0}
_FP_MOD = 1 << 52  # fingerprints are kept below 2**52, exact in float64


def _fingerprint(t: Optional[Tensor]) -> float:
    """A cheap O(n) checksum of a tensor's shape and exact values (its bits for floats, so NaN
    weights compare too): the sum of ``(v + 1) * m_i`` over the tensor's 16-bit words ``v``,
    with position-dependent multipliers ``m_i < 2**16`` so that a permutation changes it.  Each
    product is below 2**32, so the int64 sum cannot overflow below 2**31 words, and integer
    addition does not depend on the order of summation: every rank forms the same number from
    the same values, whatever its threads."""
    if t is None:
        return -1.0
    v = t.detach().reshape(-1)
    v = v.contiguous().view(torch.int16) if v.element_size() >= 2 else v  # bits, 16 at a time
    v = v.to(torch.int64)
    m = (torch.arange(v.numel(), device=v.device, dtype=torch.int64) * 40503) % 65521 + 1
    s = int((v + 1).mul_(m).sum().item()) if v.numel() else 0
    for d in t.shape:  # the shape too: (4, 6) and (6, 4) hold as many values
        s = s * 1000003 + d
    return float(s % _FP_MOD)


def _group_of(group):
    """The process group, its size and this process's rank in it, or a ``ValueError`` naming
    ``group`` (raised before any communication: it is the same on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: expected an initialized torch.distributed process group, found torch.distributed "
                         "not initialized (call torch.distributed.init_process_group first)")
    g = dist.group.WORLD if group is None else group
    rank = dist.get_rank(g)
    if rank < 0:
        raise ValueError(f"group: expected a process group this process belongs to, found one without it (global "
                         f"rank {dist.get_rank()})")
    return g, dist.get_world_size(g), rank


class _Call:
    """The checked scalar arguments of one call (passed through the autograd Function)."""

    def __init__(self, class_offset, num_classes, ignore_index, reduction, label_smoothing, z_loss, softcap,
                 num_items, backend):
        self.reduction, self.eps, self.z, self.cap, self.nitems, self.ignore = _options(
            reduction, label_smoothing, z_loss, softcap, num_items, ignore_index)
        self.offset = check_int(class_offset, "class_offset", int64=True)
        self.K = check_int(num_classes, "num_classes", int64=True)
        self.softcap = None if self.cap == 0.0 else self.cap
        self.backend = backend

    def meta(self, width: int, target: Tensor, weight: Optional[Tensor]) -> list:
        m = [0.0] * _META
        m[_OFFSET], m[_WIDTH], m[_K] = float(self.offset), float(width), float(self.K)
        m[_TARGET], m[_WEIGHT] = _fingerprint(target), _fingerprint(weight)
        m[_IGNORE], m[_EPS], m[_Z], m[_CAP] = float(self.ignore), self.eps, self.z, self.cap
        m[_NITEMS] = -1.0 if self.nitems is None else float(self.nitems)
        m[_RED] = _REDUCTIONS[self.reduction]
        return m


def _local(input, target, weight, args: tuple, refusal: Optional[Exception]):
    """Everything this rank can judge alone, before any communication: the checked call and the
    float64 row lse of its own (capped) classes, flattened to ``(N,)``.  ``refusal``: PyTorch's
    refusal of a ``weight`` that requires grad, judged by the caller (in grad mode)."""
    _check_args(input, target=target, weight=weight)
    if target.is_floating_point() or target.is_complex() or target.dtype is torch.bool:
        raise ValueError(f"target: expected integer class indices (the global indices in [0, num_classes)), found "
                         f"a {target.dtype} tensor (probability targets are not supported by the vocab-parallel "
                         f"loss: their share needs the global target mass, another all-reduce)")
    if refusal is not None:
        raise refusal
    call = _Call(*args)
    dim = _class_dim(input)
    if input.dim() == 0:
        raise ValueError("logits_shard: expected a tensor with a class dimension ((C,), (N, C) or (N, C, d1, ...)), "
                         "found a 0-d tensor")
    width = input.shape[dim]
    if width == 0:
        raise ValueError(f"logits_shard: expected at least one class along dim {dim}, found shape "
                         f"{tuple(input.shape)}")
    _shard(True, call.offset, call.K, width)  # class_offset + C_local <= num_classes, the core's message
    rows = tuple(s for i, s in enumerate(input.shape) if i != dim)
    if tuple(target.shape) != rows:
        raise ValueError(f"target: expected class indices shaped like logits_shard without its class dim {dim}, "
                         f"{rows}, found shape {tuple(target.shape)}")
    if weight is not None and tuple(weight.shape) != (call.K,):
        raise ValueError(f"weight: expected the whole 1-D vector of num_classes = {call.K} class weights on every "
                         f"rank, found shape {tuple(weight.shape)}")
    own = row_lse(_arr(input), axis=dim, softcap=call.softcap, backend=call.backend)
    own = own if isinstance(own, Tensor) else torch.from_numpy(np.asarray(own))
    return call, own.reshape(-1).to(input.device, torch.float64), width


def _ranks(idx) -> str:
    idx = [int(i) for i in idx]
    return ("rank " if len(idx) == 1 else "ranks ") + ", ".join(map(str, idx))


def _check_group(meta: Tensor) -> None:
    """The agreement of the ranks' calls, from the gathered ``(P, _META)`` numbers: the same
    ``ValueError`` on every rank (each judges the same gathered data)."""
    m = meta.cpu().numpy()

    def agree(col, name, what):
        vals = m[:, col]
        if not np.all(vals == vals[0]):
            odd = np.nonzero(vals != vals[0])[0]
            raise ValueError(f"{name}: expected {what} on every rank of the group, found rank 0 and "
                             f"{_ranks(odd)} disagreeing")

    agree(_K, "num_classes", "the same value")
    for col, name in ((_IGNORE, "ignore_index"), (_EPS, "label_smoothing"), (_Z, "z_loss"), (_CAP, "softcap"),
                      (_NITEMS, "num_items"), (_RED, "reduction")):
        agree(col, name, "the same value")
    agree(_TARGET, "target", "the same (global) class indices")
    agree(_WEIGHT, "weight", "the same whole (num_classes,) vector (or None)")
    K = int(m[0, _K])
    end, tiled = 0, True
    for r in np.lexsort((m[:, _WIDTH], m[:, _OFFSET])):  # by offset: each shard starts where the last ended
        if int(m[r, _OFFSET]) != end:
            tiled = False
            break
        end += int(m[r, _WIDTH])
    if not tiled or end != K:
        shards = ", ".join(f"rank {r}: [{int(m[r, _OFFSET])}, {int(m[r, _OFFSET] + m[r, _WIDTH])})"
                           for r in range(len(m)))
        raise ValueError(f"class_offset: expected the ranks' shards [class_offset, class_offset + C_local) to tile "
                         f"[0, num_classes) = [0, {K}) exactly (no gap, no overlap), found {shards}")


def _forward(input: Tensor, target: Tensor, weight: Optional[Tensor], args: tuple, group, need_grad: bool,
             refusal: Optional[Exception]):
    """The loss (replicated), this rank's gradient slice (or a placeholder) and the global lse."""
    g, P, _rank = _group_of(group)
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    err = None
    try:
        call, own, width = _local(input, target, weight, args, refusal)
        meta = torch.tensor(call.meta(width, target, weight), dtype=torch.float64, device=device)
        mine = torch.cat([own, meta])
    except Exception as e:  # still join the all-gather, so that every rank raises, none hangs
        err = e
        n = int(target.numel()) if isinstance(target, Tensor) else 0  # the row count the others send
        mine = torch.zeros(n + _META, dtype=torch.float64, device=device)
        mine[-_META + _OK] = 1.0
    parts = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(parts, mine, group=g)  # collective 1 of 2
    table = torch.stack(parts)  # (P, N + _META)
    bad = torch.nonzero(table[:, -_META + _OK] != 0).reshape(-1).tolist()
    if err is not None:
        raise err
    if bad:
        raise ValueError(f"group: {_ranks(bad)} of the group rejected its arguments (see the error raised there); "
                         f"no rank computed the loss")
    _check_group(table[:, -_META:])

    dim = _class_dim(input)
    rows = tuple(target.shape)
    lse = _fl.logsumexp(_arr(table[:, :-_META]), axis=0, backend=call.backend)  # (N,) float64
    lse = lse if isinstance(lse, Tensor) else torch.from_numpy(np.asarray(lse))
    lse = lse.reshape(rows)
    r = _fl.cross_entropy(
        _arr(input), _arr(target), axis=dim, weight=_arr(weight), ignore_index=call.ignore,
        label_smoothing=call.eps, z_loss=call.z, softcap=call.softcap, num_items=call.nitems, lse=_arr(lse),
        class_offset=call.offset, num_classes=call.K, reduction=call.reduction, return_grad=need_grad,
        backend=call.backend)
    share, grad = (r[0], _tensor(r[1], input)) if need_grad else (r, input.new_empty((0,)))
    share = share if isinstance(share, Tensor) else torch.from_numpy(np.asarray(share, dtype=np.float64))
    share = share.to(device=device, dtype=torch.float64).reshape(rows if call.reduction == "none" else ())
    dist.all_reduce(share, op=dist.ReduceOp.SUM, group=g)  # collective 2 of 2: the shares' sum
    return share.to(input.dtype), grad, lse.to(device=device, dtype=_lse_dtype(input)), dim


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The loss and global lse from the forward pass above; the backward scales the saved
    gradient slice by the upstream gradient (no communication)."""

    @staticmethod
    def forward(ctx, input, target, weight, args, group, need_grad, refusal):
        loss, grad, lse, dim = _forward(input, target, weight, args, group, need_grad, refusal)
        ctx.dim = dim
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # the lse's absent upstream gradient stays absent
        ctx.save_for_backward(grad)
        return loss, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g, _g_lse):
        d_input = _scaled(ctx.saved_tensors[0], g, ctx.dim) if ctx.needs_input_grad[0] else None
        return d_input, None, None, None, None, None, None


def cross_entropy(
    logits_shard: Tensor, target: Tensor, *, class_offset: int, num_classes: int, group=None,
    weight: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: Optional[float] = None, num_items: Optional[float] = None,
    return_lse: bool = False, backend: Optional[str] = None,
):
    r"""Vocab-parallel softmax cross-entropy: the unsharded loss of the classes sharded over
    the ranks of ``group``, with this rank's slice of the unsharded gradient.

    A collective: every rank of ``group`` must call it, with its own ``logits_shard`` and the
    same ``target``, ``weight`` and options. The result is
    :func:`fastloss.torch.cross_entropy` (and so :func:`torch.nn.functional.cross_entropy`) of
    the logits concatenated along the class dimension, on every rank; ``backward()`` gives
    ``logits_shard`` exactly its columns of the unsharded gradient.

    With rank :math:`r` holding the classes :math:`[o_r, o_r + C_r)` of :math:`K`:

    .. math::

        \operatorname{lse} = \log \sum_r e^{\operatorname{lse}_r}, \qquad
        \ell = \sum_r s_r

    where :math:`\operatorname{lse}_r` is the log-sum-exp of the rank's own (capped) logits
    and :math:`s_r` its additive share (:func:`fastloss.cross_entropy` with ``lse=``; the rank
    with ``class_offset == 0`` counts the ``lse`` terms and the z-loss):
    :math:`s_r = [o_r = 0]\,(((1-\varepsilon) w_t + \frac{\varepsilon}{K}\sum_k w_k)\operatorname{lse} + z\operatorname{lse}^2) - [t \in r](1-\varepsilon) w_t x'_t - \frac{\varepsilon}{K}\sum_{c \in r} w_c x'_c`.
    ``"mean"`` divides the summed rows by :math:`\sum_{i\ \mathrm{kept}} w_{t_i}` (or
    ``num_items``), formed on each rank from the whole target and weight. Communication: one
    ``all_gather`` of the N row lse values (float64, with a dozen numbers that check the call)
    and one ``all_reduce`` (sum) of the float64 share; the backward communicates nothing.
    Stability: each ``lse_r`` is max-shifted, and the global one is a max-shifted
    log-sum-exp of those, so a shard whose rows are all ``-inf`` (a masked block) contributes
    exactly nothing.

    Parameters
    ----------
    logits_shard : Tensor
        This rank's logits: ``(C_local,)``, ``(N, C_local)`` or ``(N, C_local, d1, ...)`` --
        the classes ``[class_offset, class_offset + C_local)`` along PyTorch's class dimension
        (dim 1, dim 0 of an unbatched input). float32, float64, float16 or bfloat16 (computed
        in float32). Differentiable.
    target : Tensor
        Integer class indices, the *global* ones in ``[0, num_classes)`` (or
        ``ignore_index``), shaped like ``logits_shard`` without its class dimension and the
        same on every rank. Probability targets are not supported (``ValueError``).
    class_offset : int
        The global index of this rank's first class.
    num_classes : int
        The number of classes of all ranks; the shards must tile ``[0, num_classes)``
        exactly (in any rank order).
    group : ProcessGroup, optional
        The ranks sharing the classes; default the world group.
    weight : Tensor, optional
        The whole ``(num_classes,)`` class-weight vector, the same on every rank.
    ignore_index, reduction, label_smoothing : as :func:`torch.nn.functional.cross_entropy`
        (``label_smoothing`` spreads its mass over all ``num_classes`` classes).
    z_loss, softcap, num_items, backend : as :func:`fastloss.torch.cross_entropy`
        (PaLM's ``z * lse**2`` with the global ``lse``; Gemma 2's cap of every shard's logits;
        the ``"mean"`` denominator).
    return_lse : bool, default False
        Also return the global row log-sum-exp of the (capped) logits (not differentiable),
        shaped like the unreduced loss, in float32 for float16/bfloat16 input (else the
        input's dtype): ``(loss, lse)``.

    Returns
    -------
    loss : Tensor
        The unsharded loss, identical on every rank, in ``logits_shard``'s dtype (summed over
        the ranks in float64): 0-d, or shaped like ``target`` with ``reduction="none"``.
    lse : Tensor
        Only with ``return_lse=True``.

    Raises
    ------
    ValueError
        On every rank when any rank's arguments are bad (that rank raises its own error,
        ``TypeError``/``ValueError``/``IndexError``/``RuntimeError`` as
        :func:`fastloss.torch.cross_entropy` would), when the shards do not tile
        ``[0, num_classes)``, or when the ranks disagree on ``num_classes``, ``target``,
        ``weight`` or an option; before any communication, when ``torch.distributed`` is not
        initialized or this process is not in ``group``.

    Notes
    -----
    Every rank must pass the same row count (``target`` is the same everywhere): the
    all-gather cannot check it, and gloo aborts the process on mismatched sizes. The loss is
    replicated, so each rank's ``backward()`` sees the same upstream gradient and no
    all-reduce is needed in the backward (as in Megatron-LM's vocab-parallel cross-entropy).
    Other semantics (every target ignored with ``"mean"``: 0 and a zero gradient; a ``-inf``
    target logit: ``+inf`` and no NaN in the gradient) are those of
    :func:`fastloss.cross_entropy`.

    Examples
    --------
    In each of ``P`` processes (``torch.distributed`` initialized, e.g. with ``gloo``)::

        C = V // P
        logits = hidden @ W[rank * C:(rank + 1) * C].T        # this rank's classes
        loss = fld.cross_entropy(logits, target, class_offset=rank * C, num_classes=V)
        loss.backward()                                       # the shard's gradient slice
    """
    args = (class_offset, num_classes, ignore_index, reduction, label_smoothing, z_loss, softcap, num_items,
            backend)
    need = isinstance(logits_shard, Tensor) and _need_grad(logits_shard)
    refusal = None
    try:  # judged here, in grad mode (the Function's forward runs without it), raised in the call's checks
        _not_differentiable("nll_loss_forward", weight=weight if isinstance(weight, Tensor) else None)
    except RuntimeError as e:
        refusal = e
    loss, lse = _VocabParallelCrossEntropy.apply(logits_shard, target, weight, args, group, need, refusal)
    return (loss, lse) if return_lse else loss
