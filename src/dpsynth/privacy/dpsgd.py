"""Patient-level DP-SGD: one DP record is one patient holding several volumes (ED and ES).

Per-patient gradients (of the patient's summed loss) come from layer taps on one batched
pass (`grad_taps`), checked against plain autograd until every parameter a chunk uses is
verified (`PatientDPSGD._patient_grads`), or else from the reference ``torch.func`` path
(``vmap`` over patients of ``grad``); Opacus' ``DPOptimizer`` then clips them, adds
Gaussian noise and averages by the expected batch size. The engine only counts its noisy steps
(`steps_taken`); privacy spent is the ledger's: a DP stage sets its ledger entry's steps
from this count at every checkpoint, and the ledger composes ε (no accountant here).

Why not Opacus' ``GradSampleModule``: its hooks treat dim 0 of every layer input as the
DP record, so with a patient's two volumes in the batch it would clip *per volume* and
protect a patient only at about 2ε (flaw 2 of the reference study). ``torch.func`` lets
the model see a patient's volumes as a batch of two inside one per-record function, and
it differentiates any layer (attention, custom blocks) without per-layer grad samplers.

Noise on the averaged gradient has std ``noise_multiplier * max_grad_norm / B`` with
``B = sample_rate * num_records`` (the expected, not the realised, batch size). An empty
Poisson batch still takes a noise-only step, and it is counted.

A patient whose gradient holds a NaN or inf contributes a zero gradient (norm 0 <= C, so
within the sensitivity) instead of poisoning the whole update; the engine counts them.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from dpsynth.errors import DpsynthError
from dpsynth.privacy.distributed import ProcessGroupInfo, device_of, make_dp_optimizer
from dpsynth.privacy.grad_taps import PatientTaps, Unsupported

Batch = Mapping[str, Tensor]
ModelFn = Callable[..., Any]
LossFn = Callable[[ModelFn, Batch], Tensor]
"""``loss_fn(model_fn, record) -> scalar`` for ONE patient: the SUM of its volumes' losses.
Every tensor of ``record`` has a leading dim of that patient's volumes (2: ED, ES);
``model_fn(*args, **kwargs)`` calls the model on them as a batch."""


def validate_model_for_dp(model: nn.Module, probe_loss: Callable[[], Tensor] | None = None) -> None:
    """Raise `DpsynthError` naming the first module or parameter that breaks patient-level DP.

    Rejected: BatchNorm (mixes records), any norm layer with running statistics (an
    unaccounted release of private statistics), and — when `probe_loss` (a zero-argument
    callable returning a scalar loss of `model`) is given — every trainable parameter the
    loss does not reach (it would only ever get noise).
    """
    # These are the privacy rules of Opacus' ModuleValidator (opacus 1.6), with messages
    # that name the module. Its other rules (nn.MultiheadAttention, LSTM, GRU) exist only
    # because its hooks cannot see inside those modules; torch.func differentiates them.
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise DpsynthError(f"model.{name}: {kind} mixes records in a batch; use GroupNorm")
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise DpsynthError(
                f"model.{name}: {kind} keeps running statistics of private data; "
                "set track_running_stats=False"
            )
    if probe_loss is None:
        return
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(probe_loss(), [p for _, p in named], allow_unused=True)
    unused = [n for (n, _), g in zip(named, grads, strict=True) if g is None]
    if unused:
        raise DpsynthError(
            f"model.{unused[0]}: trainable parameter gets no gradient from the loss "
            f"({len(unused)} such parameter(s)); freeze or remove it"
        )


# Checking the layer taps: shares of a patient's squared gradient norm (the sum over all
# trainable parameters), the unit of `_agree`'s absolute tolerance (1e-10).
_ACTIVE = 1e-8  # a parameter carrying this much of some patient's gradient needs a check
# A check verifies a parameter whose reference gradient on a probe patient carries this much of
# the largest probe patient's squared norm: `_agree` then catches that gradient mixed into any
# probe patient, or an error of a third of it (a patient mixed in is O(1)). Ten
# times below `_ACTIVE` so that dropout, on in the chunk's pass and off in the check, does
# not leave a parameter that needed a check unverified by it.
_VERIFIED = 1e-9
_PROBE = 3  # patients per check: odd, so neither a pairwise swap nor a mean can look right
_MAX_CHECKS = 16  # one costs 1.3 chunk steps in train mode (bench_taps_check.py, demo)


def _num_patients(batch: Batch) -> int:
    if not batch:
        return 0
    sizes = {len(v) for v in batch.values()}
    if len(sizes) != 1:
        raise DpsynthError(f"DP batch: tensors disagree on the number of patients {sorted(sizes)}")
    return sizes.pop()


def _derive_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


class PatientDPSGD:
    """Patient-level DP-SGD engine around an optimizer (Opacus `DPOptimizer` semantics).

    Args:
        model: the network; the engine never wraps it (see module docstring).
        optimizer: a plain torch optimizer over the model's trainable parameters.
        noise_multiplier: σ; noise std on the summed clipped gradient is σ·max_grad_norm.
        max_grad_norm: C, the L2 bound on each patient's gradient.
        sample_rate: q, the Poisson probability that a patient joins a logical batch.
        num_records: N, the number of private patients.
        physical_batch_size: patients per vmap chunk; a logical batch is split into such
            chunks and gives one noisy step (virtual steps).
        generator: noise generator. It MUST be secret: whoever knows its seed can remove
            the noise. Default: seeded from OS entropy. It is never saved: a resumed run
            draws fresh noise (see `load_state_dict`).
        sampling_seed: secret base seed of the Poisson sampler (who knows it knows which
            patients were sampled, which voids amplification by subsampling). Default: OS
            entropy. Checkpoints hold it, so they are private files.
        secure_rng: use Opacus' floating-point-attack-safe noise and draw fresh OS entropy
            for every noise step and every epoch's sampling (rank 0 draws it under
            torchrun); runs are then not reproducible.
        distributed: torchrun mode (see `dpsynth.privacy.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        num_records: int,
        physical_batch_size: int,
        generator: torch.Generator | None = None,
        sampling_seed: int | None = None,
        secure_rng: bool = False,
        distributed: bool = False,
    ) -> None:
        if noise_multiplier < 0:
            raise DpsynthError(f"noise_multiplier: must be >= 0, got {noise_multiplier}")
        if max_grad_norm <= 0:
            raise DpsynthError(f"max_grad_norm: must be > 0, got {max_grad_norm}")
        if num_records < 1:
            raise DpsynthError(f"num_records: must be >= 1, got {num_records}")
        if not 0 < sample_rate <= 1:
            raise DpsynthError(f"sample_rate: must be in (0, 1], got {sample_rate}")
        if physical_batch_size < 1:
            raise DpsynthError(f"physical_batch_size: must be >= 1, got {physical_batch_size}")
        validate_model_for_dp(model)

        self.model = model
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sample_rate = float(sample_rate)
        self.num_records = int(num_records)
        self.expected_batch_size = self.sample_rate * self.num_records
        self.physical_batch_size = int(physical_batch_size)
        self.secure_rng = secure_rng
        self.steps_taken = 0
        self.nonfinite_records = 0  # patient-steps whose gradient was zeroed (NaN/inf)

        if generator is None:
            generator = torch.Generator(device=next(model.parameters()).device)
            generator.manual_seed(secrets.randbits(63))
        self.generator = generator
        self._sampling_seed = secrets.randbits(63) if sampling_seed is None else sampling_seed

        self.group = ProcessGroupInfo.current() if distributed else ProcessGroupInfo.single()
        if distributed:
            self._sampling_seed = self.group.sync_model_and_seed(model, self._sampling_seed)
        self.optimizer: DPOptimizer = make_dp_optimizer(
            optimizer,
            group=self.group,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            generator=self.generator,
            secure_mode=secure_rng,
        )
        # Counted where Opacus adds the noise: every released step, an empty batch's too.
        self.optimizer.attach_step_hook(self._count_step)

        trainable = {id(p) for p in self.optimizer.params}
        self._trainable = {n: p for n, p in model.named_parameters() if id(p) in trainable}
        if len(self._trainable) != len(trainable):
            raise DpsynthError("optimizer: holds parameters that are not in the model")
        # Layer taps (`grad_taps`): None until the first chunk of >= 2 patients, then taps or
        # False (torch.func); the trainable parameters no check has verified yet.
        self._taps: PatientTaps | bool | None = None
        self._unverified = set(self._trainable)
        # the modules in train mode when the checks ran: a check in eval mode skips the
        # train-mode test, so other modes start the verification again
        self._checked_modes = _training_modules(model)
        self.tap_checks = 0
        self._chunks_by_path = {"layer taps": 0, "torch.func": 0}

    def _count_step(self, optimizer: DPOptimizer) -> None:
        self.steps_taken += 1

    @property
    def steps_per_epoch(self) -> int:
        return int(1 / self.sample_rate)  # Opacus' convention: one expected pass over N

    def logical_batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield the epoch's Poisson logical batches as arrays of patient indices (maybe empty).

        The draw depends only on (secret sampling seed, epoch), so a resumed run re-creates
        the epoch and skips the batches it already took. In distributed mode every rank
        draws the same global batch and yields its share ``batch[rank::world_size]``.
        """
        if self.secure_rng:  # fresh entropy, but ONE draw: every rank must cut the same batch
            seed = self.group.broadcast_seed(secrets.randbits(63), device_of(self.model))
        else:
            seed = _derive_seed(self._sampling_seed, epoch)
        sampler = UniformWithReplacementSampler(
            num_samples=self.num_records,
            sample_rate=self.sample_rate,
            generator=torch.Generator().manual_seed(seed),
        )
        for indices in sampler:
            yield np.asarray(indices, dtype=np.int64)[self.group.rank :: self.group.world_size]

    def step(self, batch: Batch | Iterable[Batch], loss_fn: LossFn) -> float:
        """Take one noisy step on a logical batch; return its mean per-patient loss.

        `batch` maps names to tensors of shape (patients, volumes, ...), or is an iterable
        of such mappings (e.g. loaded lazily); both are cut into physical chunks. The
        returned loss is a raw statistic of private data: log it, never release it.
        Patients with a non-finite gradient are left out of it and added to
        `nonfinite_records` (summed over ranks).
        """
        if self.secure_rng:
            self.generator.manual_seed(secrets.randbits(63))
        chunks = [
            c for b in ([batch] if isinstance(batch, Mapping) else batch) for c in self._split(b)
        ]
        loss_sum, dropped = 0.0, 0
        for i, chunk in enumerate(chunks):
            chunk_loss, chunk_dropped = self._set_grad_samples(chunk, loss_fn)
            loss_sum, dropped = loss_sum + chunk_loss, dropped + chunk_dropped
            if i < len(chunks) - 1:
                self.optimizer.signal_skip_step(do_skip=True)  # clip and accumulate only
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if not chunks:  # empty Poisson batch: the mechanism still releases noise, and is counted
            for p in self._trainable.values():
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_records += self.group.sum(dropped, device_of(self.model))
        n = sum(_num_patients(c) for c in chunks) - dropped
        return loss_sum / n if n else float("nan")

    def _split(self, batch: Batch) -> Iterator[Batch]:
        n = _num_patients(batch)
        for start in range(0, n, self.physical_batch_size):
            yield {k: v[start : start + self.physical_batch_size] for k, v in batch.items()}

    def _set_grad_samples(self, chunk: Batch, loss_fn: LossFn) -> tuple[float, int]:
        """Put per-patient gradients of `chunk` into ``p.grad_sample``.

        Returns the loss sum of the patients with finite gradients and the number of the
        others, whose gradients are zeroed here, before clipping.
        """
        grads, losses = self._patient_grads(chunk, loss_fn)
        # One NaN would make the clipped sum, and so every weight, NaN whatever C is. A sum
        # holding a NaN or inf is not finite; so is one that overflows, whose patient the
        # clipping would scale to 0 anyway. One pass per parameter, no copy when all are finite.
        finite = torch.stack([g.flatten(1).sum(1) for g in grads.values()]).sum(0).isfinite()
        keep_all = bool(finite.all())
        for name, p in self._trainable.items():
            g = grads[name]
            p.grad_sample = (
                g if keep_all else torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0)
            )
        return float(losses[finite].sum()), int((~finite).sum())

    def _patient_grads(self, chunk: Batch, loss_fn: LossFn) -> tuple[dict[str, Tensor], Tensor]:
        """Per-patient gradients {name: (P, *shape)} and losses (P,): from the layer taps
        where the checks against plain autograd vouch for them, else from torch.func.

        The checks guard the privacy guarantee, not only the speed: a layer whose rows are
        not grouped patient-major would mix patients in one "patient" gradient, and then
        clipping would no longer bound one patient's influence. A check compares the taps
        with autograd on up to `_PROBE` patients of the chunk, per parameter and per patient
        (`_agree`) and, in train mode, tests that no patient's gradient moves with another's
        record (`_independent`); a failure sends the engine to torch.func for good. A check
        sees only the parameters its patients' gradients use (a null-condition embedding,
        a module used by some records), so the engine keeps the parameters not yet verified
        (reference gradient on a probe patient >= `_VERIFIED` of the largest probe
        patient's, taps agreeing). The rule:
        a chunk keeps its taps gradients only if every parameter carrying >= `_ACTIVE` of
        some patient's gradient there (1e-4 of its norm; `_agree` tolerates 1e-5 as
        rounding) is verified, if need be by a check on the patients using the most such
        parameters; otherwise that chunk goes through torch.func. A parameter that never gets a
        gradient (a bias of attention keys: softmax ignores it) costs a sum per chunk, never
        a check; after `_MAX_CHECKS` checks, a chunk that needs another one sends the
        engine to torch.func for good. A chunk of one patient has no one to mix with.
        """
        if self._taps is None and _num_patients(chunk) >= 2:
            try:
                self._taps = PatientTaps(self.model, self._trainable)
            except Unsupported:
                self._taps = False
        if self._taps:
            try:
                grads, losses = self._taps(chunk, loss_fn)
                if self._vouched(chunk, loss_fn, grads):
                    self._chunks_by_path["layer taps"] += 1
                    return grads, losses
            except Unsupported as e:
                warnings.warn(
                    f"DP-SGD: per-patient gradients through torch.func ({e})", stacklevel=3
                )
                self._taps = False
        self._chunks_by_path["torch.func"] += 1
        return self._vmap_grads(chunk, loss_fn)

    @property
    def per_patient_path(self) -> str:
        """How per-patient gradients were computed: "layer taps" (checked against autograd,
        see `_patient_grads`), "torch.func" (the reference), or "layer taps and torch.func"
        when chunks took both (e.g. before a check disagreed)."""
        used = [path for path, n in self._chunks_by_path.items() if n]
        if not used:  # no chunk yet: the path the engine would try first
            return "torch.func" if self._taps is False else "layer taps"
        return " and ".join(used)

    def _vouched(self, chunk: Batch, loss_fn: LossFn, grads: dict[str, Tensor]) -> bool:
        """Whether every parameter active in the taps' `grads` of `chunk` is verified, after
        a check if need be (the rule of `_patient_grads`)."""
        modes = _training_modules(self.model)
        if modes != self._checked_modes:
            self._unverified, self._checked_modes = set(self._trainable), modes
        if not self._unverified or _num_patients(chunk) < 2:
            return True
        total = sum(_squared_norm(g) for g in grads.values())
        # a non-finite patient is zeroed before clipping (`_set_grad_samples`): never probed
        finite = total.isfinite() & (total > 0)
        share = {
            n: torch.where(finite, _squared_norm(grads[n]) / total, 0.0) for n in self._unverified
        }
        active = {n for n in self._unverified if (share[n] >= _ACTIVE).any()}
        if not active:
            return True
        if self.tap_checks == _MAX_CHECKS:
            warnings.warn(
                f"DP-SGD: layer taps unverified for {min(active)} after {_MAX_CHECKS} checks; "
                "using torch.func",
                stacklevel=4,
            )
            self._taps = False
            return False
        # the patients using the most of them: a record using a rare module comes first
        uses = torch.stack([share[n] >= _ACTIVE for n in active]).sum(0)
        uses = torch.where(finite, uses, -1)
        probe = uses.argsort(descending=True, stable=True)[: min(_PROBE, int(finite.sum()))]
        if len(probe) < 2 or not self._check(chunk, loss_fn, probe):
            return False
        return not active & self._unverified

    def _check(self, chunk: Batch, loss_fn: LossFn, probe: Tensor) -> bool:
        """Whether the taps give plain autograd's per-patient gradients on the `probe`
        patients of `chunk` (dropout off) and, for a model training in train mode, keep each
        patient's gradient its own there (`_independent`); the parameters it verifies leave
        `_unverified`, and a failure turns the taps off. Probe patients with one and the
        same record prove nothing (an average of equals looks right): such a chunk goes to
        torch.func, and a later one is checked."""
        records = {k: v[probe] for k, v in chunk.items()}
        if all(_same_record(records, 0, i) for i in range(1, len(probe))):
            return False
        self.tap_checks += 1
        # modes per module: a submodule kept in eval (or in train) must stay so
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            fast, fast_loss = self._taps(records, loss_fn)
            ref, ref_loss = self._autograd_grads(records, loss_fn)
        finally:
            for module, mode in modes.items():
                module.training = mode
        if not (_agree(fast, ref) and torch.allclose(fast_loss, ref_loss, rtol=1e-4)):
            failure = "disagree with autograd"
        elif any(modes.values()) and not self._independent(records, loss_fn):
            failure = "mix patients in train mode"
        else:
            failure = None
        if failure:
            warnings.warn(f"DP-SGD: layer taps {failure}; using torch.func", stacklevel=5)
            self._taps = False
            return False
        # Against the LARGEST probe total, not the patient's own: `_agree`'s absolute
        # tolerance is 1e-10 of each patient's total, so a rule that adds the others'
        # gradients to a patient's own passes that patient and shows only on the others
        # (review20: a rare parameter at 1e-8 of one probe's norm, the other probes 100x
        # larger, was verified while its rule summed the chunk).
        floor = _VERIFIED * sum(_squared_norm(g) for g in ref.values()).max()
        self._unverified -= {n for n in self._unverified if (_squared_norm(ref[n]) >= floor).any()}
        return True

    def _independent(self, records: Batch, loss_fn: LossFn) -> bool:
        """Whether, in train mode, the taps' gradients of the probe patients stay put when
        any one other patient's record is replaced by a different one, the random draws
        (dropout, a KL autoencoder's latent) held equal by a forked random state.

        The comparison with autograd runs in eval mode, because autograd one patient at a
        time cannot reproduce a batch's draws; so a rule that only train mode takes went
        unseen (review: a layer subtracting the batch's mean latent in train mode passed
        it). What clipping needs is that a patient's gradient depends on no one else's
        record; this tests exactly that, in the mode training runs in, changing each patient
        in turn so that mixing within any pair of them shows. With equal draws the kept
        patients' gradients are bit for bit equal on CPU, hence a tolerance 1e4 times below
        `_agree`'s, room left for GPU kernels that sum in varying order."""

        def taps(rows: Tensor) -> dict[str, Tensor]:
            # each pass starts from the same state and hands it back unchanged: equal draws,
            # and training's own stream does not notice the check
            with torch.random.fork_rng(devices=devices):
                return self._taps({k: v[rows] for k, v in records.items()}, loss_fn)[0]

        tensors = [*records.values(), *self._trainable.values()]
        devices = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
        rows = torch.arange(_num_patients(records))
        patients = rows.tolist()
        before = taps(rows)
        for changed in patients:
            other = next(
                i for i in patients if i != changed and not _same_record(records, changed, i)
            )
            after = taps(torch.where(rows == changed, other, rows))
            kept = rows != changed
            new, old = ({n: g[kept] for n, g in d.items()} for d in (after, before))
            if not _agree(new, old, rel=1e-10, floor=1e-14):
                return False
        return True

    def _autograd_grads(self, chunk: Batch, loss_fn: LossFn) -> tuple[dict[str, Tensor], Tensor]:
        """Per-patient gradients by plain autograd, one patient at a time: the definition,
        at the memory of a plain step on one patient (the check must not set the peak)."""
        names, params = list(self._trainable), list(self._trainable.values())
        grads: dict[str, list[Tensor]] = {n: [] for n in names}
        losses = []
        for i in range(_num_patients(chunk)):
            loss = loss_fn(self.model, {k: v[i] for k, v in chunk.items()})
            for n, p, g in zip(
                names, params, torch.autograd.grad(loss, params, allow_unused=True), strict=True
            ):
                grads[n].append(torch.zeros_like(p) if g is None else g)
            losses.append(loss.detach())
        return {n: torch.stack(g) for n, g in grads.items()}, torch.stack(losses)

    def _vmap_grads(self, chunk: Batch, loss_fn: LossFn) -> tuple[dict[str, Tensor], Tensor]:
        """Reference path: ``vmap`` over patients of ``grad`` of the patient's loss."""
        params = {n: p.detach() for n, p in self._trainable.items()}
        # Parameters outside the optimizer are constants here (e.g. a frozen UNet backbone).
        frozen = {n: t.detach() for n, t in self.model.named_parameters() if n not in params}
        frozen.update(self.model.named_buffers())

        def patient_loss(params: dict[str, Tensor], record: Batch) -> Tensor:
            def model_fn(*args: Any, **kwargs: Any) -> Any:
                return functional_call(self.model, (params, frozen), args, kwargs)

            return loss_fn(model_fn, record)

        # randomness="different": each patient draws its own dropout masks.
        return vmap(grad_and_value(patient_loss), in_dims=(None, 0), randomness="different")(
            params, dict(chunk)
        )

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything for an exact resume, as (tensors for safetensors, JSON-able dict).

        Model weights and the global torch RNG (dropout) are the caller's to save, and so is
        the privacy spent (the ledger, from `steps_taken`). The noise generator is not
        saved: a resumed run never reuses noise (`load_state_dict`).
        """
        tensors: dict[str, Tensor] = {}
        meta = {
            "steps_taken": self.steps_taken,
            "nonfinite_records": self.nonfinite_records,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "num_records": self.num_records,
            "sampling_seed": self._sampling_seed,
            "optimizer": _extract_tensors(self.optimizer.state_dict(), "optimizer", tensors),
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned; the DP parameters must match this engine.

        The Poisson sampler's seed is restored (the steps re-taken after the checkpoint draw
        the batches the ledger plans for), but the noise generator is reseeded from OS
        entropy: steps the interrupted run computed after its checkpoint are computed again
        with fresh noise, so an output of that run could never be combined with the new one
        to cancel noise.
        """
        for key in ("noise_multiplier", "max_grad_norm", "sample_rate", "num_records"):
            if meta[key] != getattr(self, key):
                raise DpsynthError(
                    f"checkpoint: {key} is {meta[key]} but this run uses {getattr(self, key)}"
                )
        self.steps_taken = int(meta["steps_taken"])
        self.nonfinite_records = int(meta.get("nonfinite_records", 0))
        self._sampling_seed = int(meta["sampling_seed"])
        self.generator.manual_seed(secrets.randbits(63))
        self.optimizer.load_state_dict(_insert_tensors(meta["optimizer"], tensors))


def _extract_tensors(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by ``{"tensor": key}``, storing it in `tensors`."""
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().clone().contiguous()
        return {"tensor": key}
    if isinstance(obj, Mapping):
        # JSON keys are strings: remember int keys (optimizer state is keyed by param index).
        return {"items": [[k, _extract_tensors(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_extract_tensors(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _insert_tensors(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(obj, Mapping):
        if "tensor" in obj:
            return tensors[obj["tensor"]]
        return {k: _insert_tensors(v, tensors) for k, v in obj["items"]}
    if isinstance(obj, list):
        return [_insert_tensors(v, tensors) for v in obj]
    return obj


def _squared_norm(grad: Tensor) -> Tensor:
    """(P,) squared norms of a parameter's per-patient gradients (P, *shape)."""
    return grad.flatten(1).square().sum(1)


def _training_modules(model: nn.Module) -> frozenset[str]:
    return frozenset(name for name, m in model.named_modules() if m.training)


def _same_record(batch: Batch, i: int, j: int) -> bool:
    """Whether patients i and j of `batch` carry equal records (NaN, an unknown attribute,
    equal to NaN)."""
    return all(
        bool((v[i] == v[j]).logical_or(v[i].isnan() & v[j].isnan()).all())
        if v.is_floating_point()
        else torch.equal(v[i], v[j])
        for v in batch.values()
    )


def _agree(
    fast: dict[str, Tensor], ref: dict[str, Tensor], *, rel: float = 1e-6, floor: float = 1e-10
) -> bool:
    """Per parameter AND per patient: the difference's squared norm within `rel` of that
    parameter's squared gradient norm plus `floor` of the patient's whole (float32 rounding
    is ~1e-6; a parameter whose rows mix patients is off by O(1) of its own gradient).

    Per parameter because a summed comparison lets the large convolutions drown a small
    layer that mixes patients (review finding: a Linear over a table shared by the batch).
    """
    total = sum(_squared_norm(g) for g in ref.values())
    return all(
        (_squared_norm(fast[n] - g) <= rel * _squared_norm(g) + floor * total).all()
        for n, g in ref.items()
    )
