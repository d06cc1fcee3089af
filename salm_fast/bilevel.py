"""The bi-level min-min trainer (the protector's engine).

    min_theta  E[ L(f_theta(A(x + delta)), y) ]          surrogate steps
    min_delta  E[ L(f_theta(A(x + delta)), y) ]          perturbation steps (error-minimizing)

alternate in rounds until the surrogate's accuracy on the perturbed training data
reaches a threshold (default 99%) or a round cap. ``A`` is the attacker's usual
augmentation (crop + flip) when the loop is augmentation-aware, so that the noise
stays a shortcut under the transformations a victim will apply.

What is optimized (one delta per image, per class, or a generator) is a
:class:`~salm_fast.noise.Noise`; this module only runs the alternation, measures,
logs every round as a JSON line, checkpoints after every round and resumes from a
checkpoint to exactly the result of an uninterrupted run (all randomness comes from
one seeded ``torch.Generator`` whose state is checkpointed with everything else).

The noise sees the loop through a :class:`~salm_fast.noise.LoopView` that the trainer owns.
A round hook (e.g. SALM's mask refresh) returns a new mask or None; the trainer applies it
and tells the noise (:meth:`BiLevelTrainer.apply_mask`).

Data and device: the trainer takes its images through a
:class:`~salm_fast.data.view.ImageView` (uint8 as stored, float made per batch on the device),
keeps the labels and the uint8 mask on the device, and puts every surrogate it builds there;
the loop's random stream stays on the CPU (the same draws on every device). Nothing in it is
global: a trainer is its data view, its models and its stream, so several can run side by side.

Many processes (``torchrun``, :mod:`salm_fast.distributed`): each rank's trainer holds its shard
of the images. Every batch of the loop is split over the ranks (rank r draws its share of
``batch_size`` from its shard, from a random stream of its own), and the surrogate's (and the
noise's) gradients are averaged over the ranks weighted by those shares before every optimizer
step: each step is the step one process takes on the union of the ranks' batches, the models
stay identical on every rank (BatchNorm statistics are averaged the same way). The round's
statistics (the stop rule's accuracy included) are summed over the ranks, so every rank takes
the same decisions and runs the same number of steps. Rank 0 writes the round log and the
checkpoint, which holds every rank's state; a resumed run must have the same number of ranks.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as D
from . import surrogate as S
from .data.atomic import atomic_path
from .data.view import ImageView, as_view, pass_batch
from .noise import LoopView, Noise
from .runtime import autocast, choose_precision, crop_flip

CHECKPOINT_VERSION = 1


@dataclass
class BiLevelConfig:
    """Every setting of the alternation, with its unit."""

    max_rounds: int = 20  # rounds of (surrogate steps, perturbation pass)
    surrogate_steps: int = 10  # optimizer steps of the surrogate per round
    surrogate_lr: float = 1e-3  # Adam
    surrogate_reset_every: int = 0  # re-initialize the surrogate every n rounds (0: never)
    batch_size: int = 128  # images per surrogate / perturbation batch
    stop_accuracy: float = 0.99  # stop once the surrogate fits the perturbed data this well
    min_rounds: int = 1  # never stop before this many rounds
    eval_images: int = 0  # images the stop rule's accuracy is measured on (0: all; else a fixed seeded subset)
    precision: str = "auto"  # surrogate forward/backward: auto (from the CPU, see runtime.choose_precision) | fp32 | bf16
    augment: bool = True  # crop + flip inside the loop (augmentation-aware noise)
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError on settings the loop cannot run with (0 rounds would release clean images)."""
        ints = ("max_rounds", "surrogate_steps", "surrogate_reset_every", "batch_size", "min_rounds", "eval_images",
                "seed")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"loop: {name} must be an int, got {value!r}")
        if self.max_rounds < 1 or self.surrogate_steps < 1 or self.batch_size < 1:
            raise ValueError(f"loop: max_rounds ({self.max_rounds}), surrogate_steps ({self.surrogate_steps}) and "
                             f"batch_size ({self.batch_size}) must be >= 1")
        if not 0 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"loop: min_rounds must be in [0, max_rounds={self.max_rounds}], got {self.min_rounds}")
        if self.surrogate_reset_every < 0 or self.eval_images < 0 or self.seed < 0:
            raise ValueError("loop: surrogate_reset_every, eval_images and seed must be >= 0")
        if not (self.surrogate_lr > 0 and 0 <= self.stop_accuracy):
            raise ValueError(f"loop: surrogate_lr must be > 0 and stop_accuracy >= 0, got {self.surrogate_lr}, "
                             f"{self.stop_accuracy}")


@dataclass
class RoundLog:
    round: int
    surrogate_loss: float
    noise_loss: float
    surrogate_accuracy: float  # on the perturbed training data (or its eval subset), no augmentation
    seconds: float  # wall time of this round
    images_per_second: float  # perturbation images processed per second in this round
    extra: dict = field(default_factory=dict)


#: Runs after every round; returns a new mask (applied by the trainer) or None.
RoundHook = Callable[["BiLevelTrainer"], "Tensor | None"]


class BiLevelTrainer:
    """Alternate surrogate and perturbation updates; checkpoint and resume.

    ``x`` (an :class:`~salm_fast.data.view.ImageView`, or a float N x C x H x W tensor in
    [0, 1]), ``y`` (N int64) and ``mask`` (N x 1 x H x W, {0, 1}) are the protected images,
    their labels and the pixels the noise may touch. ``device``: where the loop runs (None: the
    view's, or the tensor's). Each of ``round_hooks`` runs after every round, before the
    checkpoint, and returns a new mask (same shape) or None.
    """

    def __init__(self, surrogate_factory: Callable[[], nn.Module], noise: Noise, x: ImageView | Tensor, y: Tensor,
                 mask: Tensor, config: BiLevelConfig, *, log_path: str | Path | None = None,
                 checkpoint_path: str | Path | None = None, progress: bool = False,
                 description: str = "protect", round_hooks: list[RoundHook] | None = None,
                 settings: dict | None = None, device: str | torch.device | None = None):
        config.validate()
        self.factory, self.noise, self.cfg = surrogate_factory, noise, config
        # What else defines the run (method, its options, the data): a checkpoint resumes only under the same.
        self.settings = dict(settings or {})
        self.x = as_view(x, device)
        self.device = self.x.device
        self.n_classes = int(y.max()) + 1  # read before the move: one host read, whatever the device
        self.y = y.to(self.device)
        mask = mask.to(self.device, torch.uint8)
        self.log_path = Path(log_path) if log_path else None
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress, self.description = progress, description
        self.round_hooks = list(round_hooks or [])
        self.rank, self.world = D.world()
        n = len(self.x)
        # Many processes: the images of all ranks; each rank's stream is its own (its batches, crops, flips).
        self.n_total = int(D.all_reduce_sum(torch.tensor([n])).item()) if self.world > 1 else n
        if self.world > 1:
            if min(config.batch_size, self.n_total) < self.world:
                raise ValueError(f"loop: batch_size {config.batch_size} splits over {self.world} processes only if it "
                                 f"is at least {self.world} (and so must the images: {self.n_total})")
        self.gen = torch.Generator().manual_seed(D.rank_seed(config.seed, self.rank))
        self.view = LoopView(self.x, self.y, mask, self.gen, self.loss, self._sample, self.n_total)
        n_eval = config.eval_images if 0 < config.eval_images < self.n_total else self.n_total
        n_eval = min(n, D.share(n_eval, self.rank, self.world))  # this rank's part of the stop rule's subset
        # A fixed subset, drawn from its own stream so that it does not shift the loop's randomness.
        self.eval_idx = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed + 1))[:n_eval]
        self.round = 0
        self.history: list[RoundLog] = []
        self.stopped_because = ""
        self._new_surrogate()
        if self.world > 1:
            self.noise.synchronize()  # e.g. a generator's weights: rank 0's on every rank
        self.precision, self.precision_reason = self._choose_precision()

    # ----------------------------------------------------------------- pieces
    @property
    def mask(self) -> Tensor:
        """The pixels the noise may touch now (N x 1 x H x W); a round hook may replace it."""
        return self.view.mask

    def apply_mask(self, mask: Tensor) -> None:
        """Replace the mask (kept as uint8 on the loop's device) and move the stored perturbations inside it."""
        if not isinstance(mask, Tensor) or mask.shape != self.mask.shape:
            raise RuntimeError(f"a round hook returned a mask of shape {getattr(mask, 'shape', type(mask))}, "
                               f"not {tuple(self.mask.shape)} (a bug)")
        mask = mask.to(self.device, torch.uint8)
        self.view.mask = mask
        self.noise.on_mask_change(self.x, mask)

    def _new_surrogate(self) -> None:
        # Built on the CPU from the seeded CPU stream, then moved: the same weights on every device.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self.gen)))
        self.model = self.factory().to(self.device)
        D.broadcast_module(self.model)  # many processes: rank 0's weights (the streams differ by rank)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.surrogate_lr)

    def _choose_precision(self) -> tuple[str, str]:
        chosen = choose_precision(self.cfg.precision, self.device, model=self.factory(),
                                  sample_shape=(min(self.cfg.batch_size, 64), *self.x.shape[1:]),
                                  num_classes=self.n_classes)
        return tuple(D.broadcast_object(chosen))  # many processes: rank 0's (a timed choice could differ)

    def autocast(self):
        return autocast(self.precision, self.device)

    def augmented(self, xb: Tensor, yb: Tensor) -> Tensor:
        """The victim's augmentation, differentiable w.r.t. the perturbation inside ``xb``."""
        if not self.cfg.augment:
            return xb
        return crop_flip(xb, self.gen)

    def loss(self, xb: Tensor, yb: Tensor) -> Tensor:
        with self.autocast():
            out = S.logits(self.model, self.augmented(xb, yb))
        return F.cross_entropy(out.float(), yb)

    def _sample(self) -> Tensor:
        """A batch of indices into this rank's images: ``batch_size`` (at most all images), of which a
        rank of many takes its share."""
        size = min(self.cfg.batch_size, self.n_total)
        if self.world > 1:
            size = min(D.share(size, self.rank, self.world), len(self.x))
        return torch.randint(0, len(self.x), (size,), generator=self.gen)

    def _sync_surrogate(self, n_images: int) -> None:
        """Many processes: the surrogate's gradients and BatchNorm statistics, averaged over the ranks
        (weighted by their images in this step). One process: nothing."""
        if self.world > 1:
            D.average_gradients(self.model.parameters(), n_images, buffers=self.model.buffers())

    def surrogate_phase(self) -> float:
        self.model.train()
        loss = torch.zeros(())
        for _ in range(self.cfg.surrogate_steps):
            idx = self._sample()
            x = self.x[idx]
            with torch.no_grad():
                delta = self.noise.delta(idx, x, self.y[idx], self.mask[idx])
            loss = self.loss(x + delta, self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self._sync_surrogate(len(idx))
            self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def perturbed_accuracy(self) -> float:
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)  # summed on the device: one sync
        step = pass_batch(self.x.shape)
        for start in range(0, len(self.eval_idx), step):
            idx = self.eval_idx[start:start + step]
            x = self.x[idx]
            xb = x + self.noise.delta(idx, x, self.y[idx], self.mask[idx])
            with self.autocast():
                correct += (S.logits(self.model, xb).argmax(1) == self.y[idx]).sum()
        if self.world > 1:  # every rank's subset: the same accuracy, hence the same stop decision, on every rank
            both = D.all_reduce_sum(torch.stack([correct.cpu(), torch.tensor(len(self.eval_idx))]))
            return int(both[0]) / max(1, int(both[1]))
        return int(correct) / len(self.eval_idx)

    # ----------------------------------------------------------------- loop
    def run(self) -> list[RoundLog]:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.cfg.max_rounds, initial=self.round, desc=self.description, unit="round",
                   disable=not self.progress, leave=False)
        try:
            while self.round < self.cfg.max_rounds:
                if self.cfg.surrogate_reset_every and self.round and self.round % self.cfg.surrogate_reset_every == 0:
                    self._new_surrogate()
                t0 = time.perf_counter()
                s_loss = self.surrogate_phase()
                self.model.eval()
                n_loss, n_images, extra = self.noise.optimize(self.view)
                acc = self.perturbed_accuracy()
                if self.world > 1:  # the log's losses: the ranks' mean; its images: all ranks'
                    s_loss, n_loss, n_images = self._round_totals(s_loss, n_loss, n_images)
                dt = time.perf_counter() - t0
                entry = RoundLog(self.round, s_loss, n_loss, acc, dt, n_images / dt if dt > 0 else 0.0, extra)
                self.history.append(entry)
                self.round += 1
                for hook in self.round_hooks:
                    mask = hook(self)
                    if mask is not None:
                        self.apply_mask(mask)
                self._write_log(entry)
                done = acc >= self.cfg.stop_accuracy and self.round >= self.cfg.min_rounds
                self.stopped_because = (f"surrogate accuracy {acc:.3f} >= {self.cfg.stop_accuracy}" if done
                                        else f"round cap {self.cfg.max_rounds}")
                self.save_checkpoint(finished=done or self.round >= self.cfg.max_rounds)
                bar.update(1)
                bar.set_postfix(surrogate_acc=f"{acc:.3f}", loss=f"{n_loss:.3f}")
                if done:
                    break
        finally:
            bar.close()
        return self.history

    def _round_totals(self, s_loss: float, n_loss: float, n_images: int) -> tuple[float, float, int]:
        t = D.all_reduce_sum(torch.tensor([s_loss, n_loss, float(n_images)], dtype=torch.float64))
        return float(t[0]) / self.world, float(t[1]) / self.world, int(t[2])

    # ----------------------------------------------------------------- state
    def _write_log(self, entry: RoundLog) -> None:
        if self.log_path is None or self.rank != 0:
            return
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(asdict(entry)) + "\n")

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "config": asdict(self.cfg),
            "settings": self.settings,
            "round": self.round,
            "surrogate": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "noise": self.noise.state_dict(),
            "mask": self.mask,
            "generator_state": self.gen.get_state(),
            "precision": [self.precision, self.precision_reason],
            "history": [asdict(h) for h in self.history],
            "stopped_because": self.stopped_because,
        }

    def save_checkpoint(self, finished: bool = False) -> None:
        if self.checkpoint_path is None:
            return
        state = self.state_dict()
        state["finished"] = finished
        if self.world > 1:
            # Every rank's state (its images' noise and mask, its stream) on rank 0, which writes one file.
            ranks = D.gather_objects(_to_cpu(state))
            if self.rank != 0:
                return
            state = {"version": CHECKPOINT_VERSION, "config": state["config"], "settings": state["settings"],
                     "world_size": self.world, "round": self.round, "finished": finished, "ranks": ranks}
        with atomic_path(self.checkpoint_path) as tmp:
            torch.save(state, tmp)

    def load_checkpoint(self, path: str | Path) -> bool:
        """Restore a checkpoint; returns whether that run had already finished. Many processes: rank 0
        reads the file and hands every rank its own state (the same number of ranks as wrote it)."""
        if self.world > 1:
            return self._load_state(path, self._scatter_checkpoint(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
        ranks = state.get("world_size", 1)
        if ranks != 1:
            raise ValueError(f"{path}: the checkpoint was written by {ranks} processes; resume it with torchrun "
                             f"--nproc-per-node (x nodes) = {ranks}, or start afresh")
        return self._load_state(path, state)

    def _scatter_checkpoint(self, path: str | Path) -> dict:
        parts: list | None = None
        if self.rank == 0:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                ranks = state.get("world_size", 1)
                if state.get("version") != CHECKPOINT_VERSION:
                    raise ValueError(f"{path}: checkpoint version {state.get('version')} is not "
                                     f"{CHECKPOINT_VERSION}")
                if ranks != self.world:
                    raise ValueError(f"{path}: the checkpoint was written by {ranks} process(es), this run has "
                                     f"{self.world}; resume with the same number or start afresh")
                parts = list(state["ranks"])
            except (OSError, ValueError, RuntimeError, KeyError) as exc:  # every rank raises the same error
                parts = [{"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)}
                         ] * self.world
        state = D.scatter_objects(parts)
        if "error" in state:
            raise ValueError(state["error"])
        return state

    def _load_state(self, path: str | Path, state: dict) -> bool:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
        if state["config"] != asdict(self.cfg):
            changed = sorted(k for k in state["config"] if state["config"][k] != asdict(self.cfg).get(k))
            raise ValueError(f"{path}: the checkpoint was made with different settings ({', '.join(changed)}); "
                             "resume with the same settings or start afresh")
        saved = state.get("settings", self.settings)  # absent from checkpoints written before it was recorded
        if saved != self.settings:
            changed = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
            raise ValueError(f"{path}: the checkpoint was made with different settings ({', '.join(changed)}); "
                             "resume with the same settings or start afresh")
        self.round = state["round"]
        self.model.load_state_dict(state["surrogate"])
        self.opt.load_state_dict(state["optimizer"])
        self.noise.load_state_dict(state["noise"])
        self.view.mask = state["mask"].to(self.device, torch.uint8)  # the noise was saved inside it: nothing to move
        self.gen.set_state(state["generator_state"])
        # The precision chosen when the run began, not a new (timing-based) choice.
        self.precision, self.precision_reason = state["precision"]
        self.history = [RoundLog(**h) for h in state["history"]]
        self.stopped_because = state.get("stopped_because", "")
        if self.log_path is not None and self.rank == 0:  # the log always matches the checkpoint it belongs to
            lines = "".join(json.dumps(h) + "\n" for h in state["history"])
            with atomic_path(self.log_path) as tmp:
                tmp.write_text(lines, encoding="utf-8")
        return bool(state.get("finished", False))


def _to_cpu(obj):
    """``obj`` with every tensor moved to the CPU (a rank's checkpoint state, before it is sent to rank 0)."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
