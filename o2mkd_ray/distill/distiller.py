"""Ray-free distillation of one student on one timestep segment (pure PyTorch): :class:`SegmentDistiller` is one
step of it; :func:`o2mkd_ray.distill.loop.run` is the loop both engines drive it with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import replace_dir, write_json
from o2mkd_ray.core.conditioning import call_denoiser, cond_batch, cond_kwargs, cond_where
from o2mkd_ray.core.features import FeatureHooks, hookable_blocks, probe_feature_channels
from o2mkd_ray.core.flow_matching import draw_segment_t
from o2mkd_ray.core.kd import KDLoss
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.core.targets import task_target
from o2mkd_ray.core.teacher import batch_cond
from o2mkd_ray.core.transformer_students import disable_label_dropout
from o2mkd_ray.data.images import random_flip
from o2mkd_ray.distill.checkpoints import MANIFEST, TRAIN_STATE, config_hash, hash_files, verify_checkpoint
from o2mkd_ray.distill.ema import EMA

TeacherCallable = Callable[..., tuple[torch.Tensor, dict | None]]


class SegmentDistiller:
    """Student k, its EMA, KD loss (with adapters) and optimizer; one ``train_step`` per batch.

    A learned-sigma teacher (DiT: its output is the noise prediction, then as many channels of variance
    interpolation) is distilled on its whole output: the pipeline's sampler reads the first half, and a scheduler
    with learned variance (or any code that splits the output as ``DiTPipeline`` does) the second, so a student
    trained on both is a drop-in replacement for the teacher's transformer. The task loss compares the first half.

    Args:
        cfg: the resolved config.
        k: segment index.
        segments: the timestep segments.
        scheduler: the teacher's training noise scheduler (``add_noise``).
        student: the student network (unwrapped).
        teacher_channels: channels of the teacher's hooked blocks (``{}`` / None: no feature KD).
        wrap: optional wrapper for the training forward (Ray's ``prepare_model`` → DDP).
        rank: data-parallel rank (seeds differ per rank).
        uncond: conditional students: the empty prompt's embedding ``(1, L, D)`` (DiT: ``{"class_labels"}`` with
            the null class); each sample's condition is replaced by it with probability ``data.uncond_prob``
            (:meth:`make_cond`), so the student learns the unconditional branch classifier-free guidance needs.
    """

    def __init__(self, cfg: Config, k: int, segments: Segments, scheduler, student: nn.Module,
                 teacher_channels: dict[str, int] | None, wrap: Callable[[nn.Module], nn.Module] | None = None,
                 rank: int = 0, device: torch.device | str = "cpu", uncond: torch.Tensor | None = None):
        self.cfg, self.k, self.segments, self.scheduler = cfg, k, segments, scheduler
        self.uncond = uncond
        self.device = torch.device(device)
        self.student = student.to(self.device)
        disable_label_dropout(self.student)  # DiT: the run drops labels itself, the same ones for the teacher
        shape = (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
        cfg_s = getattr(student, "config", None)
        if cfg_s is not None and isinstance(getattr(cfg_s, "sample_size", None), int):
            shape = (cfg_s.in_channels, cfg_s.sample_size, cfg_s.sample_size)
        self.shape = shape
        student_channels = None
        if cfg.kd.lambda_feat > 0 and teacher_channels:
            # blocks both have (a BK-SDM student without a mid block skips the teacher's mid_block)
            mine = set(hookable_blocks(self.student))
            blocks = [b for b in (cfg.kd.feature_blocks or list(teacher_channels)) if b in teacher_channels and b in mine]
            student_channels = probe_feature_channels(self.student, (1, *shape), blocks)
        self.kd = KDLoss(cfg.kd, student_channels, teacher_channels or None).to(self.device)
        self.blocks = list(self.kd.blocks) if self.kd.uses_features else []
        self.hooks = FeatureHooks(self.student, self.blocks) if self.blocks else None
        self.model = wrap(self.student) if wrap else self.student
        self.ema_weights = EMA(self.student, cfg.train.ema_decay)
        params = [p for p in self.student.parameters()] + [p for p in self.kd.parameters()]
        self.opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        tr = cfg.train
        self.steps = budget = tr.segment_steps(k)  # this segment's step budget
        # linear warmup then cosine decay to 10 % over the segment's own budget (a standard short-schedule recipe)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            lambda s: min(1.0, (s + 1) / max(1, tr.warmup_steps))
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / budget)))),
        )
        self.step = 0
        self.gen = torch.Generator().manual_seed(tr.seed * 7919 + 1000 * k + rank)

    # ----------------------------------------------------------------------------------------------------------
    def make_inputs(self, x_0: torch.Tensor, generator: torch.Generator | None = None):
        """``x_0: (B, C, H, W)`` → ``(x_t, t, target)`` with ``t`` drawn inside segment k: uniform integers, or for
        a flow-matching teacher (SD3) floats from its scheduler's shifted distribution restricted to the segment
        (:func:`~o2mkd_ray.core.flow_matching.draw_segment_t`; ``x_t`` is then diffusers' ``scale_noise``).

        ``target`` is the task loss's ground truth in the teacher's parameterisation: the noise ε for ε-prediction,
        the velocity for v-prediction (ε − x_0 for flow matching), x_0 for ``sample``
        (:func:`~o2mkd_ray.core.targets.task_target`).
        """
        g = generator or self.gen
        if self.cfg.data.random_flip:
            x_0 = random_flip(x_0, g)
        t = draw_segment_t(self.scheduler, self.segments, self.k, x_0.shape[0], g)  # (B,)
        eps = torch.randn(x_0.shape, generator=g)  # (B, C, H, W)
        x_t = self.scheduler.add_noise(x_0, eps, t)
        return x_t, t, task_target(self.scheduler, x_0, eps, t)

    def make_cond(self, cond, generator: torch.Generator | None = None):
        """The batch's condition (:mod:`o2mkd_ray.core.conditioning`) with each sample's swapped for the empty
        prompt's with prob ``data.uncond_prob``."""
        if cond is None or self.uncond is None or self.cfg.data.uncond_prob <= 0:
            return cond
        drop = torch.rand(cond_batch(cond), generator=generator or self.gen) < self.cfg.data.uncond_prob  # (B,)
        return cond_where(drop, self.uncond, cond)

    def _forward(self, model: nn.Module, x_t, t, cond=None):
        out = call_denoiser(model, x_t.to(self.device), t.to(self.device), **cond_kwargs(cond, self.device))
        return out.sample if hasattr(out, "sample") else out

    def train_step(self, x_t, t, target, eps_T, feats_T=None, cond=None) -> dict[str, float]:
        """One AdamW step on the KD loss; returns the loss terms, lr and grad norm.

        ``target``: the task target from :meth:`make_inputs`; ``eps_T``: the teacher's raw output (ε, v or x_0);
        ``cond``: the batch's condition (text embeddings ``(B, L, D)``, a dict for SDXL) or None.
        """
        self.model.train()
        if self.hooks is not None:
            self.hooks.clear()
        eps_S = self._forward(self.model, x_t, t, cond)  # (B, C, H, W)
        feats_S = self.hooks.features if self.hooks is not None else None
        loss, terms = self.kd(eps_S, eps_T.to(self.device), target.to(self.device), feats_S,
                              {k: v.to(self.device) for k, v in feats_T.items()} if feats_T else None)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average_kd_grads()
        gn = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.train.grad_clip or float("inf"))
        self.opt.step()
        self.lr_sched.step()
        self.ema_weights.step(self.student)
        self.step += 1
        terms.update(lr=self.opt.param_groups[0]["lr"], grad_norm=float(gn))
        return terms

    def _average_kd_grads(self) -> None:
        """Averages the KD loss's own gradients (feature adapters) over the data-parallel ranks.

        DDP (``wrap``) averages the student's gradients only; the adapters live outside it, so without this each
        rank would step them on its own batch and they would drift apart (and rank 0's would be checkpointed).
        """
        dist = torch.distributed
        if self.model is self.student or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        grads = [p.grad for p in self.kd.parameters() if p.grad is not None]
        if world < 2 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for all of them
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    @property
    def ema(self) -> nn.Module:
        """The student with the EMA weights (what ``val_loss`` scores and ``OUT/segments/seg-KK/ema`` holds)."""
        return self.ema_weights.module

    @torch.no_grad()
    def val_loss(self, batches: list[tuple]) -> float:
        """Output-KD MSE of the EMA student on fixed held-out ``(x_t, t, eps_T[, cond])`` batches (selects "best")."""
        if not batches:
            return float("nan")
        tot = 0.0
        for x_t, t, eps_T, *cond in batches:
            eps_S = self._forward(self.ema, x_t, t, cond[0] if cond else None)
            tot += torch.mean((eps_S - eps_T.to(self.device)) ** 2).item()
        return tot / len(batches)

    # ----------------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Writes a checkpoint folder atomically (temp folder, then rename) with a manifest of file hashes."""
        directory = Path(directory)
        with replace_dir(directory) as tmp:
            self.student.save_pretrained(tmp / "student", safe_serialization=True)
            self.ema.save_pretrained(tmp / "ema", safe_serialization=True)
            torch.save({"step": self.step, "optimizer": self.opt.state_dict(), "lr_sched": self.lr_sched.state_dict(),
                        "kd": self.kd.state_dict(), "gen": self.gen.get_state(), "ema": self.ema_weights.state_dict()},
                       tmp / TRAIN_STATE)
            manifest = {"step": self.step, "segment": self.k, "boundaries": list(self.segments.boundaries),
                        "config_hash": config_hash(self.cfg), "files": hash_files(tmp), **(extra or {})}
            write_json(tmp / MANIFEST, manifest)
        return directory

    def load(self, directory: str | Path) -> dict:
        """Restores student, EMA, optimizer, KD adapters and step from a checkpoint folder (verified)."""
        from diffusers import UNet2DModel

        directory = Path(directory)
        manifest = verify_checkpoint(directory, self.cfg)  # also rejects a checkpoint of another config
        cls = type(self.student) if hasattr(self.student, "from_pretrained") else UNet2DModel  # its own class
        self.student.load_state_dict(cls.from_pretrained(directory / "student").state_dict())
        state = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
        self.ema_weights.load(cls.from_pretrained(directory / "ema").state_dict(), state.get("ema"), state["step"])
        self.opt.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr_sched"])
        self.kd.load_state_dict(state["kd"])
        self.gen.set_state(state["gen"])
        self.step = int(state["step"])
        return manifest


def fixed_val_batches(distiller: SegmentDistiller, dataset, teacher: TeacherCallable, n: int,
                      batch_size: int) -> list[tuple]:
    """Held-out ``(x_t, t, eps_T)`` batches (``+ cond`` for text-conditioned data) from a fixed generator, the same
    for every rank and every resume."""
    if n <= 0:
        return []
    g = torch.Generator().manual_seed(10_000 + distiller.k)
    out = []
    for _ in range(n):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g)
        items = [dataset[int(i)] for i in idx]
        x_0 = torch.stack([it[0] for it in items])
        cond = batch_cond(items)
        t = draw_segment_t(distiller.scheduler, distiller.segments, distiller.k, batch_size, g)
        eps = torch.randn(x_0.shape, generator=g)
        x_t = distiller.scheduler.add_noise(x_0, eps, t)
        eps_T, _ = teacher(x_t, t, features=False, **({} if cond is None else {"cond": cond}))
        out.append((x_t, t, eps_T) if cond is None else (x_t, t, eps_T, cond))
    return out
