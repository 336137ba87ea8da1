"""User-level differentially private training (DP-SGD) with Opacus: its accountant, its noise calibration and
its optimizer (per-sample clipping + Gaussian noise); the per-user gradients it clips are computed here.

The privacy unit is a user: each step Poisson-samples users (rate q) and each sampled user contributes one
window of their history (data/user_sampling.py), so one user's whole influence on a step is one clipped
gradient. Every trainable part learns from user data and trains under DP: the ID embeddings and content
projections of the item tower, the fusion, the history encoder (and profile/context parts, the ranker when
on). The frozen image/text features are product content, not user data. Scores need the full softmax over
the catalogue: the sampled loss would use other users' items as negatives, so one user's gradient would
depend on others'.

Reference: Abadi et al., "Deep Learning with Differential Privacy", CCS 2016; McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018 (user-level sampling).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer

from multimodal_rec.models.components.scoring import item_scores

log = logging.getLogger(__name__)


class PrivacyBudgetError(RuntimeError):
    """Training would spend more than the target epsilon."""


class UserLevelPrivacy:
    def __init__(self, epsilon: float, delta: float | None = None, max_grad_norm: float = 1.0,
                 accountant: str = "rdp", enabled: bool = True):
        if not epsilon > 0:
            raise ValueError(f"privacy.epsilon must be positive, got {epsilon}")
        if max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be positive, got {max_grad_norm}")
        self.epsilon, self.delta, self.max_grad_norm = float(epsilon), delta, float(max_grad_norm)
        self.kind = accountant
        self.accountant = create_accountant(accountant)
        self.noise_multiplier = self.sample_rate = None
        self.n_users = 0

    @property
    def steps(self) -> int:
        """Steps taken so far, as the accountant's history counts them."""
        return sum(int(entry[-1]) for entry in self.accountant.history)

    def restore(self, report: dict, history: list) -> None:
        """A resumed run goes on with the noise it was planned with and the steps it has spent."""
        self.n_users = report["n_users"]
        self.sample_rate, self.noise_multiplier = report["sample_rate"], report["noise_multiplier"]
        self.delta = report["delta"]
        self.accountant.history = [tuple(entry) for entry in history]

    def plan(self, n_users: int, expected_batch: int, epochs: int) -> None:
        """The noise that spends exactly the target epsilon over `epochs` epochs of Poisson-sampled users."""
        if self.noise_multiplier is not None:  # restored from a checkpoint: its plan stands
            log.info("DP-SGD resumed: epsilon %.3f of %.2f spent in %d steps", self.spent(), self.epsilon, self.steps)
            return
        self.n_users = n_users
        self.sample_rate = min(1.0, expected_batch / n_users)
        self.delta = float(self.delta) if self.delta is not None else 1.0 / n_users
        self.planned_steps = epochs * math.ceil(1 / self.sample_rate)
        self.noise_multiplier = get_noise_multiplier(target_epsilon=self.epsilon, target_delta=self.delta,
                                                     sample_rate=self.sample_rate, steps=self.planned_steps,
                                                     accountant=self.kind)
        log.info("DP-SGD: user-level (epsilon %.2f, delta %.2g), %d users, sample rate %.4f, %d steps planned, "
                 "noise multiplier %.3f, max grad norm %.2f", self.epsilon, self.delta, n_users, self.sample_rate,
                 self.planned_steps, self.noise_multiplier, self.max_grad_norm)

    def wrap(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        return DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                           expected_batch_size=max(1, round(self.sample_rate * self.n_users)), loss_reduction="mean")

    def spent(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.steps else 0.0

    def would_exceed(self) -> bool:
        """Whether one more step would take the spent epsilon past the target."""
        ahead = copy.deepcopy(self.accountant)
        ahead.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return ahead.get_epsilon(self.delta) > self.epsilon

    def step(self) -> None:
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def report(self) -> dict:
        return {"unit": "user", "epsilon_target": self.epsilon, "epsilon_spent": round(self.spent(), 4),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "max_grad_norm": self.max_grad_norm, "steps": self.steps, "accountant": self.kind,
                "n_users": self.n_users}


def per_user_losses(model, batch: dict, ignore: int, item_vectors: torch.Tensor) -> torch.Tensor:
    """(B,) each sampled user's mean next-item loss over their window, against `item_vectors` (N, d), the
    whole catalogue (full softmax; items never trained on are out of it, as in training)."""
    targets = batch["targets"]
    valid = targets != ignore
    queries = model.queries(batch["history"], batch["user"], batch["context_hour"], item_vectors=item_vectors)[valid]
    similarity = item_scores(queries, item_vectors).masked_fill(model.untrained_items, float("-inf"))  # (P, N)
    per_position = F.cross_entropy(similarity * model.logit_scale, targets[valid], reduction="none")  # (P,)
    rows = torch.nonzero(valid)[:, 0]
    sums = per_position.new_zeros(len(targets)).index_add(0, rows, per_position)
    return sums / valid.sum(1).clamp_min(1)


def per_sample_gradients(model, batch: dict, ignore: int, params: list[torch.nn.Parameter]) -> tuple:
    """((B, *shape) per parameter: the gradient of each user's loss alone, the (B,) losses).

    The catalogue's item vectors V are computed once. A forward and backward pass per user through their own
    loss alone gives dL_i/dV and the query side's gradient (cheap: one history against V); the item tower's
    per-user gradients then come from one batched backward of V with those cotangents."""
    tower_params = {id(p) for p in model.item_tower.parameters()}
    vectors = model.all_item_embeddings()[0]  # (N, d), attached to the item tower
    detached = vectors.detach().requires_grad_()
    query_side = [p for p in params if id(p) not in tower_params]
    cotangents, query_grads, losses = [], [], []
    for i in range(len(batch["targets"])):
        alone = {key: value[i:i + 1] for key, value in batch.items()}
        loss = per_user_losses(model, alone, ignore, detached)[0]
        grads = torch.autograd.grad(loss, [detached, *query_side], allow_unused=True)
        cotangents.append(grads[0])
        query_grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads[1:], query_side)])
        losses.append(loss.detach())
    tower_side = [p for p in params if id(p) in tower_params]
    tower_grads = torch.autograd.grad(vectors, tower_side, grad_outputs=torch.stack(cotangents),
                                      is_grads_batched=True, allow_unused=True)
    by_id = {id(p): (torch.zeros((len(losses), *p.shape), device=p.device) if g is None else g)
             for p, g in zip(tower_side, tower_grads)}
    by_id.update({id(p): torch.stack([row[j] for row in query_grads]) for j, p in enumerate(query_side)})
    return [by_id[id(p)] for p in params], torch.stack(losses)


def private_step(model, batch: dict, ignore: int) -> None:
    """One DP-SGD step under Lightning's manual optimisation; stops training before the budget is exceeded."""
    privacy: UserLevelPrivacy = model.privacy
    if privacy.would_exceed():
        model.trainer.should_stop = True
        if not getattr(model, "_budget_logged", False):
            log.warning("stopping: one more step would spend more than epsilon %.2f (spent %.3f after %d steps)",
                        privacy.epsilon, privacy.spent(), privacy.steps)
            model._budget_logged = True
        return
    optimizer = model.optimizers()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad()
    if len(batch["targets"]):
        grad_samples, losses = per_sample_gradients(model, batch, ignore, params)
        for param, grad_sample in zip(params, grad_samples):
            param.grad_sample = grad_sample
        model.log("train/loss", losses.mean(), prog_bar=True, batch_size=len(losses))
    else:  # Poisson sampling drew nobody: the step is noise alone, and is accounted like any other
        for param in params:
            param.grad_sample = torch.zeros((0, *param.shape), device=param.device, dtype=param.dtype)
    optimizer.step()
    privacy.step()
