"""Per-patient gradients from ONE batched forward and backward of the model (no vmap of it).

`torch.func`'s ``vmap(grad(...))`` over patients (the reference path in `dpsgd.py`) holds a
vmap call's per-sample intermediates and runs every layer's backward through batching
rules: 2.7x the peak memory of a plain step at the same physical batch (BENCHMARKS.md).
Here the model runs as in a plain step, on all the chunk's volumes at once, and each layer
that owns trainable parameters gets a "tap" on its output. In the backward pass the tap
receives that layer's output gradient and, with the layer's input, computes the layer's
per-patient parameter gradients at once (the layer-wise instantiation of book-keeping, Bu et
al. 2023, "fastDP"); the input and output gradient are then freed with the rest of the
graph. Autograd never computes the summed parameter gradients (the backward asks only for
a dummy "anchor" leaf that every tap takes), so no weight gradient is computed twice.

Why not Opacus' ``GradSampleModule`` / ``GradSampleModuleFastGradientClipping`` (opacus
1.6): both take dim 0 of every layer input as the DP record, so they clip per volume, not
per patient (see `dpsgd.py`), and the ghost-clipping variant needs a second backward pass.
A patient here is a group of V consecutive volumes: each rule below sums a layer's
per-volume contributions over the patient's volumes, as the patient-level loss does. Ghost
norms (never instantiating per-sample gradients) would not pay off: a 3D convolution's
per-patient gradient (C_out x C_in x k) is far smaller than its ghost-norm Gram matrix over
V x S x h x w positions, and all per-patient gradients together are P x parameters
(118 MiB for the demo denoiser at 16 patients).

Only the per-patient loss values still come from ``vmap`` over patients: `loss_fn` is
written for one patient, so it runs under vmap as before, while its ``model_fn`` leaves
vmap through an ``autograd.Function`` with a vmap rule that calls the model on the
physical batch (patients x volumes flattened).

Layers with a rule: Linear, Conv1d/2d/3d (zero padding), GroupNorm, LayerNorm. A module
owning trainable parameters of another kind (e.g. a learned embedding added by the module's
own code) gets the generic rule: ``vmap`` over patients of the VJP of that module alone.
Models with trainable parameters on the root module, or anything the rules cannot vouch
for, raise `Unsupported`, and the engine keeps the reference path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

Batch = Mapping[str, Tensor]


class Unsupported(Exception):
    """The model (or this call) is outside what the taps can compute exactly."""


def _linear(module: nn.Linear, args: tuple, g: Tensor, patients: int) -> dict[str, Tensor]:
    # Rows of every leading dim flatten batch-major, so a patient's rows are consecutive.
    a = args[0].reshape(patients, -1, module.in_features)
    g = g.reshape(patients, -1, module.out_features)
    out = {"weight": torch.bmm(g.transpose(1, 2), a)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight}
_CONV_WEIGHT[3] = torch.nn.grad.conv3d_weight


def _per_patient_sum(t: Tensor, patients: int) -> Tensor:
    """(P*n, ...) -> (P, ...): sum each patient's consecutive rows."""
    return t.reshape(patients, -1, *t.shape[1:]).sum(1)


def _channel_sums(t: Tensor) -> Tensor:
    """(N, C, *space) -> (N, C), reducing the contiguous last dims (fast on CPU)."""
    return t.flatten(2).sum(-1)


def _conv(module: nn.modules.conv._ConvNd, args: tuple, g: Tensor, patients: int) -> dict:
    if module.padding_mode != "zeros" or isinstance(module.padding, str) or module.transposed:
        raise Unsupported(f"{type(module).__name__} with padding {module.padding!r}")
    a, n = args[0], args[0].shape[0]
    # (N, C, *space) -> (1, N*C, *space) is a view: every volume becomes one group of a
    # grouped convolution, whose weight gradient is then per volume (N*C_out, C_in/groups,
    # *k) without copying the activations; a patient's volumes are summed afterwards.
    weight = _CONV_WEIGHT[len(module.kernel_size)](
        a.reshape(1, -1, *a.shape[2:]),
        (n * module.out_channels, module.in_channels // module.groups, *module.kernel_size),
        g.reshape(1, -1, *g.shape[2:]),
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=n * module.groups,
    )
    out = {"weight": _per_patient_sum(weight.reshape(n, *module.weight.shape), patients)}
    if module.bias is not None:
        out["bias"] = _per_patient_sum(_channel_sums(g), patients)
    return out


def _group_norm(module: nn.GroupNorm, args: tuple, g: Tensor, patients: int) -> dict:
    # d/dw = sum_s g * x_hat with x_hat = (x - mean) * rstd per (volume, group): from
    # sum_s g * x and sum_s g per channel, without materialising x_hat (a plain step's
    # memory, and a third of the passes over the activation).
    x = args[0]
    n, c, groups = x.shape[0], module.num_channels, module.num_groups
    var, mean = torch.var_mean(x.reshape(n, groups, -1), dim=-1, unbiased=False)
    rstd = (var + module.eps).rsqrt().repeat_interleave(c // groups, dim=1)
    mean = mean.repeat_interleave(c // groups, dim=1)
    g_sum = _channel_sums(g)
    gx_sum = torch.einsum("ncs,ncs->nc", g.flatten(2), x.flatten(2))
    return {
        "weight": _per_patient_sum(rstd * (gx_sum - mean * g_sum), patients),
        "bias": _per_patient_sum(g_sum, patients),
    }


def _layer_norm(module: nn.LayerNorm, args: tuple, g: Tensor, patients: int) -> dict:
    shape = module.normalized_shape
    normed = F.layer_norm(args[0], shape, eps=module.eps)
    out = {"weight": (g * normed).reshape(patients, -1, *shape).sum(1)}
    if module.bias is not None:
        out["bias"] = g.reshape(patients, -1, *shape).sum(1)
    return out


def _at_least_float32(v: Any) -> Any:
    """bf16/fp16 activations (autocast) give float32 per-patient gradients; float64 stays."""
    if isinstance(v, Tensor) and v.is_floating_point():
        return v.to(torch.promote_types(v.dtype, torch.float32))
    return v


_RULES: dict[type, Callable[..., dict[str, Tensor]]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
}


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to the taps."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, anchor: Tensor, site: _Site) -> Tensor:
        ctx.site = site
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        site, ctx.site = ctx.site, None  # free the layer's input with the rest of the graph
        site.taps.accumulate(site, grad)
        return grad, None, None


class _Site:
    """One call of a tapped module: what its rule needs in the backward pass."""

    __slots__ = ("taps", "name", "module", "args", "kwargs")

    def __init__(self, taps: PatientTaps, name: str, module: nn.Module, args, kwargs) -> None:
        self.taps, self.name, self.module, self.args, self.kwargs = taps, name, module, args, kwargs


class _ModelCall(torch.autograd.Function):
    """``model_fn`` inside the per-patient vmap: run the model on the physical batch."""

    @staticmethod
    def forward(call: _Call, anchor: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            call.outputs = call.taps.run_model(call, tensors)
        return tuple(o.detach() for o in call.outputs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.call = inputs[0]
        ctx.num_inputs = len(inputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[None, ...]:
        call, ctx.call = ctx.call, None
        pairs = [(o, g) for o, g in zip(call.outputs, grads, strict=True) if g is not None]
        call.outputs = None
        if pairs:
            torch.autograd.grad(
                [o for o, _ in pairs],
                [call.taps.anchor],
                [g for _, g in pairs],
                allow_unused=True,
            )
        return (None,) * ctx.num_inputs

    @staticmethod
    def vmap(info: Any, in_dims: tuple, call: _Call, anchor: Tensor, *tensors: Tensor) -> Any:
        patients, flat, volumes = info.batch_size, [], set()
        for t, dim in zip(tensors, in_dims[2:], strict=True):
            if dim is None:  # the same for every patient: a constant, passed as is
                flat.append(t)
                continue
            t = t.movedim(dim, 0)
            if t.dim() < 2:
                raise Unsupported("a model input without a volume dimension")
            volumes.add(t.shape[1])
            flat.append(t.reshape(patients * t.shape[1], *t.shape[2:]))
        if len(volumes) != 1:
            raise Unsupported(f"model inputs disagree on volumes per patient {sorted(volumes)}")
        call.taps.patients, call.taps.volumes = patients, volumes.pop()
        outs = _ModelCall.apply(call, anchor, *flat)
        rows = patients * call.taps.volumes
        if any(o.dim() == 0 or o.shape[0] != rows for o in outs):
            raise Unsupported("a model output that is not per volume")
        return tuple(o.reshape(patients, -1, *o.shape[1:]) for o in outs), (0,) * len(outs)


class _Call:
    """One ``model_fn(*args, **kwargs)`` call: its argument layout and its graph's outputs."""

    def __init__(self, taps: PatientTaps, spec: Any, leaves: list, tensor_at: list[int]) -> None:
        self.taps, self.spec, self.leaves, self.tensor_at = taps, spec, leaves, tensor_at
        self.outputs: tuple[Tensor, ...] | None = None
        self.out_spec: Any = None
        self.out_leaves: list = []
        self.out_tensor_at: list[int] = []


class PatientTaps:
    """Per-patient gradients of a model's trainable parameters through layer taps.

    Args:
        model: the network; its modules that own parameters in `trainable` are tapped.
        trainable: name -> parameter, the parameters to differentiate (the rest are constants).

    Raises `Unsupported` when a trainable parameter sits directly on `model` (its generic
    rule would re-run the whole model per patient).
    """

    def __init__(self, model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> None:
        self.model = model
        by_id = {id(p): n for n, p in trainable.items()}
        # module name -> (module, rule or None for the generic one, {local name: global name})
        self.sites: dict[str, tuple[nn.Module, Callable | None, dict[str, str]]] = {}
        for mname, module in model.named_modules():
            own = {
                local: by_id[id(p)]
                for local, p in module.named_parameters(recurse=False)
                if id(p) in by_id
            }
            if not own:
                continue
            if module is model:
                raise Unsupported(f"trainable parameter {next(iter(own.values()))} on the model")
            self.sites[mname] = (module, _RULES.get(type(module)), own)
        found = {g for _, _, own in self.sites.values() for g in own.values()}
        if found != set(trainable):
            raise Unsupported("trainable parameters outside the model's modules")
        self.trainable = dict(trainable)
        self.anchor: Tensor | None = None
        self.patients = self.volumes = 0
        self.grads: dict[str, Tensor] = {}
        self._active = False

    def __call__(self, chunk: Batch, loss_fn: Callable) -> tuple[dict[str, Tensor], Tensor]:
        """Per-patient gradients {name: (P, *shape)} and losses (P,) of `chunk`."""
        device = next(iter(self.trainable.values())).device
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self.grads = {}
        handles = [
            module.register_forward_hook(self._hook(name), with_kwargs=True)
            for name, (module, _, _) in self.sites.items()
        ]
        try:

            def patient_loss(record: Batch) -> Tensor:
                return loss_fn(self._model_fn, record)

            losses = vmap(patient_loss, randomness="different")(dict(chunk))
            if losses.dim() != 1:
                raise Unsupported("loss_fn must return a scalar per patient")
            if losses.requires_grad:
                torch.autograd.grad(losses.sum(), [self.anchor], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            self.anchor = None
        patients = len(losses)
        grads = {
            n: self.grads.pop(n)
            if n in self.grads
            else p.new_zeros((patients, *p.shape))  # unused in this forward: gradient 0
            for n, p in self.trainable.items()
        }
        return grads, losses.detach()

    def _model_fn(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        tensor_at = [i for i, v in enumerate(leaves) if isinstance(v, Tensor)]
        call = _Call(self, spec, leaves, tensor_at)
        outs = _ModelCall.apply(call, self.anchor, *(leaves[i] for i in tensor_at))
        out_leaves = list(call.out_leaves)
        for i, o in zip(call.out_tensor_at, outs, strict=True):
            out_leaves[i] = o
        return tree_unflatten(out_leaves, call.out_spec)

    def run_model(self, call: _Call, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The model on the physical batch, with taps active (called by `_ModelCall`)."""
        if any(t.requires_grad for t in tensors):
            raise Unsupported("a model input that depends on the model (chained calls)")
        leaves = list(call.leaves)
        for i, t in zip(call.tensor_at, tensors, strict=True):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, call.spec)
        self._active = True
        try:
            out = self.model(*args, **kwargs)
        finally:
            self._active = False
        out_leaves, call.out_spec = tree_flatten(out)
        call.out_tensor_at = [i for i, v in enumerate(out_leaves) if isinstance(v, Tensor)]
        call.out_leaves = out_leaves
        return tuple(out_leaves[i] for i in call.out_tensor_at)

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
            if not self._active:
                return None
            if not isinstance(out, Tensor) or not out.requires_grad:
                raise Unsupported(f"model.{name}: output is not one differentiable tensor")
            return _Tap.apply(out, self.anchor, _Site(self, name, module, args, kwargs))

        return hook

    def accumulate(self, site: _Site, grad: Tensor) -> None:
        """Add one module call's per-patient gradients (called by `_Tap.backward`)."""
        module, rule, own = self.sites[site.name]
        rows = self.patients * self.volumes
        if grad.dim() == 0 or grad.shape[0] % rows:
            raise Unsupported(f"model.{site.name}: output rows are not volumes x positions")
        if rule is None:
            local = self._generic(site, grad)
        else:
            args = tuple(_at_least_float32(a) for a in site.args)
            local = rule(module, args, _at_least_float32(grad), self.patients)
        for lname, gname in own.items():
            g = local[lname].to(self.trainable[gname].dtype)
            self.grads[gname] = g if gname not in self.grads else self.grads[gname] + g

    def _generic(self, site: _Site, grad: Tensor) -> dict[str, Tensor]:
        """VJP of the module alone, per patient, for parameters no rule covers."""
        module, _, own = self.sites[site.name]
        if module.training and any(
            isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules()
        ):
            raise Unsupported(f"model.{site.name}: dropout inside a module without a rule")
        rows, p = self.patients * self.volumes, self.patients
        direct = {local: getattr(module, local).detach() for local in own}
        constants = {
            n: t.detach() for n, t in [*module.named_parameters(), *module.named_buffers()]
        }
        for local in own:
            constants.pop(local)

        def batched(v: Any) -> bool:
            return isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] % rows == 0

        leaves, spec = tree_flatten((site.args, site.kwargs))
        dims = [0 if batched(v) else None for v in leaves]
        split = [
            v.reshape(p, -1, *v.shape[1:]) if d == 0 else v
            for v, d in zip(leaves, dims, strict=True)
        ]

        def per_patient(inputs: list, g: Tensor) -> dict[str, Tensor]:
            args, kwargs = tree_unflatten(inputs, spec)

            def f(params: dict[str, Tensor]) -> Tensor:
                return functional_call(module, (params, constants), args, kwargs)

            return vjp(f, direct)[1](g)[0]

        return vmap(per_patient, in_dims=(dims, 0))(split, grad.reshape(p, -1, *grad.shape[1:]))
