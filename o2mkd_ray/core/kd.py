"""Knowledge-distillation losses: output KD, a registry of feature-KD methods, and UNet feature hooks.

The O2MKD objective for the student of one timestep segment (Zhang & Ma, arXiv 2410.04191):

    loss = λ_out·‖ε_S(x_t, t) − ε_T(x_t, t)‖²  +  λ_feat·L_feat(F_S, F_T)  +  λ_task·‖ε_S(x_t, t) − ε‖²

written for ε-prediction; a v- or x_0-prediction teacher's students learn its raw output the same way, and the task
target is the ground truth of that parameterisation (:func:`o2mkd_ray.core.targets.task_target`).

The paper applies O2MKD on top of prior KD methods; ``L_feat`` is one of them, picked by ``kd.feature_method``
from :data:`KD_METHODS`. Adding a method is one small class::

    @register_kd("l1")
    class L1Feature(FeatureKD):
        def block_loss(self, block, f_s, f_t):
            return (f_s - f_t).abs().mean()
"""

from __future__ import annotations

import difflib
import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from o2mkd_ray.config.schema import KDConfig
from o2mkd_ray.errors import ConfigError

log = logging.getLogger(__name__)

KD_METHODS: dict[str, type[nn.Module]] = {}


def register_kd(name: str):
    """Class decorator adding a feature-KD method to :data:`KD_METHODS` under ``name`` (``kd.feature_method``).

    Args:
        name: the config name.
    Returns:
        The decorator; the class must take ``(student_channels, teacher_channels)`` and be an ``nn.Module`` whose
        ``forward(feats_s, feats_t)`` returns a scalar (subclassing :class:`FeatureKD` gives that for free).
    """

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in KD_METHODS and KD_METHODS[name] is not cls:
            raise ValueError(f"register_kd: {name!r} is already registered to {KD_METHODS[name].__name__}")
        KD_METHODS[name] = cls
        return cls

    return deco


def _match_size(x: Tensor, size: torch.Size) -> Tensor:
    """Resizes a (B, C, H, W) map to the target (H, W) when the two nets downsample differently."""
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FeatureKD(nn.Module):
    """Base of a feature-KD method: the mean over matched blocks of ``block_loss``.

    Subclasses implement :meth:`block_loss` and may add parameters (adapters) in ``__init__``; they are trained
    with the student and saved with the KD loss module.
    """

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int]):
        """Keeps the blocks present in both channel maps.

        Args:
            student_channels: ``{block: channels}`` of the student's features.
            teacher_channels: ``{block: channels}`` of the teacher's features; blocks in both are matched.
        """
        super().__init__()
        self.blocks = [b for b in student_channels if b in teacher_channels]
        self.student_channels = {b: int(student_channels[b]) for b in self.blocks}
        self.teacher_channels = {b: int(teacher_channels[b]) for b in self.blocks}

    def block_loss(self, block: str, f_s: Tensor, f_t: Tensor) -> Tensor:
        """Loss for one block; ``f_s`` (B, C_S, H, W), ``f_t`` (B, C_T, H, W) detached. Returns a scalar."""
        raise NotImplementedError

    def forward(self, feats_s: dict[str, Tensor], feats_t: dict[str, Tensor]) -> Tensor:
        """Mean of :meth:`block_loss` over the matched blocks.

        Args:
            feats_s: student features by block name (from :class:`FeatureHooks`).
            feats_t: teacher features by block name.
        Returns:
            A scalar tensor.
        """
        losses = []
        for b in self.blocks:
            if b not in feats_s or b not in feats_t:
                side = "student" if b not in feats_s else "teacher"
                raise KeyError(
                    f"feature KD: no {side} feature for block {b!r}; hook the blocks {self.blocks}"
                )
            losses.append(self.block_loss(b, feats_s[b], feats_t[b].detach()))
        return torch.stack(losses).mean()


def _key(block: str) -> str:
    return block.replace(".", "_")  # nn.ModuleDict keys cannot contain "."


@register_kd("fitnet")
class FitNetKD(FeatureKD):
    """FitNets (Romero et al., ICLR 2015): a 1×1 conv regressor A_l maps student features to the teacher's
    channels, loss ``MSE(A_l(F_S), F_T)`` per block.

    The adapters start as a (partial) identity rather than at random: with teacher-slice init the student's channel
    i *is* the teacher's channel i, so the first steps already compare matching channels.
    """

    def __init__(self, student_channels: dict[str, int], teacher_channels: dict[str, int]):
        super().__init__(student_channels, teacher_channels)
        self.adapters = nn.ModuleDict()
        for b in self.blocks:
            c_s, c_t = self.student_channels[b], self.teacher_channels[b]
            conv = nn.Conv2d(c_s, c_t, kernel_size=1)
            with torch.no_grad():
                conv.weight.zero_()
                conv.bias.zero_()
                n = min(c_s, c_t)
                conv.weight[:n, :n, 0, 0] = torch.eye(n)
            self.adapters[_key(b)] = conv

    def adapter(self, block: str) -> nn.Conv2d:
        """The 1×1 adapter of ``block`` (in = student channels, out = teacher channels)."""
        return self.adapters[_key(block)]

    def block_loss(self, block: str, f_s: Tensor, f_t: Tensor) -> Tensor:
        return F.mse_loss(_match_size(self.adapter(block)(f_s), f_t.shape[-2:]), f_t)


def attention_map(f: Tensor) -> Tensor:
    """Spatial attention map of Zagoruyko & Komodakis (ICLR 2017): mean over channels of F², flattened and
    L2-normalised per sample. ``f`` (B, C, H, W) -> (B, H·W)."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


@register_kd("attention")
class AttentionTransferKD(FeatureKD):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017): MSE between
    the student's and teacher's normalised spatial attention maps; no adapters, any channel counts.

    As in the authors' code (``(at(x) - at(y)).pow(2).mean()``) the per-element loss is small (maps have unit
    norm over H·W entries); the paper scales it by β = 10³, so ``kd.lambda_feat`` usually needs to be large.
    """

    def block_loss(self, block: str, f_s: Tensor, f_t: Tensor) -> Tensor:
        a_s = f_s.pow(2).mean(1, keepdim=True)  # (B, 1, H_S, W_S), resized to the teacher's grid if needed
        a_s = F.normalize(_match_size(a_s, f_t.shape[-2:]).flatten(1), dim=1)
        return F.mse_loss(a_s, attention_map(f_t))


class KDLoss(nn.Module):
    """The O2MKD objective: output KD + feature KD + task loss, with the individual terms for logging.

    Its parameters (feature adapters) are trained with the student: optimise ``student.parameters()`` and
    ``kd_loss.parameters()``, and checkpoint both state dicts.
    """

    def __init__(
        self,
        kd_cfg: KDConfig,
        student_channels: dict[str, int] | None = None,
        teacher_channels: dict[str, int] | None = None,
    ):
        """Picks the feature method and the matched blocks.

        Args:
            kd_cfg: ``cfg.kd`` (weights, ``feature_method``, ``feature_blocks``).
            student_channels: ``{block: channels}`` of the student (:func:`probe_feature_channels`); None if unknown.
            teacher_channels: the same for the teacher; None when the teacher exposes no blocks (not a UNet).
        Raises:
            ConfigError: an unregistered ``kd.feature_method`` or a ``kd.feature_blocks`` entry missing from either net.
        """
        super().__init__()
        method = KD_METHODS.get(kd_cfg.feature_method)
        if method is None:
            raise ConfigError(
                f"kd.feature_method: unknown {kd_cfg.feature_method!r}; registered: {', '.join(sorted(KD_METHODS))}"
            )
        self.lambda_out = float(kd_cfg.lambda_out)
        self.lambda_feat = float(kd_cfg.lambda_feat)
        self.lambda_task = float(kd_cfg.lambda_task)
        self.blocks: list[str] = []
        self.feature: nn.Module | None = None
        if self.lambda_feat > 0:
            s_ch, t_ch = student_channels or {}, teacher_channels or {}
            common = [b for b in s_ch if b in t_ch]
            blocks = common
            if kd_cfg.feature_blocks is not None and common:
                missing = [b for b in kd_cfg.feature_blocks if b not in common]
                if missing:
                    raise ConfigError(
                        f"kd.feature_blocks: {missing} not found in both student and teacher; available: {common}"
                    )
                blocks = list(kd_cfg.feature_blocks)
            if not blocks:
                msg = (
                    f"kd.lambda_feat={self.lambda_feat} but student and teacher share no hookable blocks "
                    "(is the teacher a UNet?); feature KD is skipped (weight set to 0)"
                )
                warnings.warn(msg, UserWarning, stacklevel=2)
                log.warning(msg)
                self.lambda_feat = 0.0
            else:
                self.blocks = blocks
                self.feature = method({b: s_ch[b] for b in blocks}, {b: t_ch[b] for b in blocks})

    @property
    def uses_features(self) -> bool:
        """True when the caller must collect student and teacher features (hooks on :attr:`blocks`)."""
        return self.feature is not None

    def forward(
        self,
        eps_s: Tensor,
        eps_t: Tensor | None,
        target: Tensor | None,
        feats_s: dict[str, Tensor] | None = None,
        feats_t: dict[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Computes the weighted loss.

        Args:
            eps_s: student output S(x_t, t), (B, C, H, W), in the teacher's parameterisation (ε, v or x_0).
            eps_t: teacher output T(x_t, t); may be None only when ``lambda_out`` is 0.
            target: the task target in that parameterisation (the noise ε for ε-prediction; see
                :func:`o2mkd_ray.core.targets.task_target`); may be None only when ``lambda_task`` is 0.
            feats_s: student block features; required when :attr:`uses_features`.
            feats_t: teacher block features; required when :attr:`uses_features`.
        Returns:
            ``(loss, terms)`` with ``terms = {"loss_out", "loss_feat", "loss_task", "loss"}`` as floats (unweighted
            terms, weighted total).
        """
        zero = eps_s.new_zeros(())
        if self.lambda_out > 0 and eps_t is None:
            raise ValueError("KDLoss: kd.lambda_out > 0 needs the teacher prediction eps_t")
        if self.lambda_task > 0 and target is None:
            raise ValueError("KDLoss: kd.lambda_task > 0 needs the task target (the true noise for ε-prediction)")
        # output KD, ‖ε_S(x_t,t) − ε_T(x_t,t)‖² (arXiv 2410.04191: each student mimics the teacher's noise
        # prediction on its own timestep segment); the teacher is a fixed target
        loss_out = F.mse_loss(eps_s, eps_t.detach()) if eps_t is not None else zero
        # task loss, ‖ε_S − ε‖²: the DDPM objective (Ho et al. 2020, eq. 14), or its v / x_0 counterpart; a
        # learned-sigma model (DiT) outputs the prediction, then the variance channels: the target is the first part
        loss_task = F.mse_loss(eps_s[:, :target.shape[1]], target) if target is not None else zero
        loss_feat = zero
        if self.feature is not None:
            if feats_s is None or feats_t is None:
                raise ValueError(f"KDLoss: feature KD needs feats_s and feats_t for blocks {self.blocks}")
            loss_feat = self.feature(feats_s, feats_t)
        loss = zero
        for w, term in (
            (self.lambda_out, loss_out),
            (self.lambda_feat, loss_feat),
            (self.lambda_task, loss_task),
        ):
            if w > 0:  # a zero weight leaves its term out of the graph
                loss = loss + w * term
        vals = torch.stack([loss_out, loss_feat, loss_task, loss]).detach().float().tolist()  # one host sync
        return loss, dict(zip(("loss_out", "loss_feat", "loss_task", "loss"), vals))


def check_kd_method(name: str, key: str = "kd.feature_method") -> None:
    """Raises ConfigError unless ``name`` is a registered feature-KD method (:func:`register_kd`)."""
    if name not in KD_METHODS:
        close = difflib.get_close_matches(name, list(KD_METHODS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key}: unknown {name!r}; {hint}registered: "
                          f"{', '.join(sorted(KD_METHODS))} (add one with o2mkd_ray.core.kd.register_kd)")
