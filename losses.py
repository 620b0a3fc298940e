"""Preference losses as ratio matching.

Every loss here is a function of per-example sequence log-probabilities under
the policy and the frozen reference, for the chosen and the rejected response.
Write the log-ratio difference

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)].

The KL-regularised optimum pi* ~ ref * exp(r / beta) has exactly
h* = (r(x, y_w) - r(x, y_l)) / beta. Each loss pulls h toward a target for h*:
REBEL uses the reward difference itself, and DPO, hinge and IPO substitute what
a binary preference implies about it.

All tensors are float with shape (batch,). Each function returns the
per-example losses and the implicit rewards beta * (log pi - log ref) of the
chosen and rejected responses, detached, so callers can log margins and
accuracies without a second pass.

`bradley_terry_loss` at the end trains the reward model that supplies r for
REBEL; it is a function of rewards, not of log-probabilities.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    """Per-example losses and implicit rewards, each of shape (batch,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def log_ratio_difference(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """Compute h, the chosen log-ratio minus the rejected log-ratio, shape (batch,)."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    return chosen_logratios - rejected_logratios


def implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute beta * (log pi - log ref) for chosen and rejected, detached."""
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen_rewards, rejected_rewards


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO: -log sigmoid(beta * h), optionally label-smoothed.

    Ratio matching: under a Bradley-Terry model of the preference, the
    optimum has beta * h* = r_w - r_l, and a label "y_w beats y_l" is the only
    evidence of that difference. The loss is the negative log-likelihood of
    the label, so it pushes beta * h up without bound: the target is
    h -> +infinity, approached at a rate that decays as sigma(beta * h) -> 1.

    With label_smoothing eps, the label is taken to be wrong with probability
    eps (conservative DPO): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h),
    whose minimum sits at the finite target h = log((1 - eps) / eps) / beta.

    Source: Rafailov et al. 2023, "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model" (arXiv:2305.18290), eq. 7;
    label smoothing from Mitchell 2023, "A note on DPO with noisy preferences
    and relationship to IPO".

    Args:
        policy_chosen_logps: log pi(y_w|x) summed over response tokens, (batch,).
        policy_rejected_logps: log pi(y_l|x), (batch,).
        reference_chosen_logps: log ref(y_w|x), (batch,).
        reference_rejected_logps: log ref(y_l|x), (batch,).
        beta: KL-regularisation strength, > 0; usually 0.01 to 0.5 with summed log-probs.
        label_smoothing: probability eps in [0, 0.5) that a label is flipped.
    """
    h = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """SLiC / RSO: relu(1 - beta * h).

    Ratio matching: the target is a margin, beta * h >= 1. Pairs that already
    reach it give no gradient, and below it the pull on h is constant.

    Source: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback" (arXiv:2305.10425), its rank calibration loss; in the
    normalised form with the reference log-ratio from Liu et al. 2023,
    "Statistical Rejection Sampling Improves Preference Optimization"
    (arXiv:2309.06657).

    Args:
        policy_chosen_logps: log pi(y_w|x) summed over response tokens, (batch,).
        policy_rejected_logps: log pi(y_l|x), (batch,).
        reference_chosen_logps: log ref(y_w|x), (batch,).
        reference_rejected_logps: log ref(y_l|x), (batch,).
        beta: inverse margin scale, > 0; the margin in h is 1 / beta.
    """
    h = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1.0 - beta * h)
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> LossOutput:
    """IPO: (h - 1 / (2 beta))^2, on log-probs averaged over response tokens.

    Ratio matching: the target is the finite log-ratio difference
    h = 1 / (2 beta), which the squared error reaches exactly. Unlike DPO the
    pull stops there, so deterministic preferences do not drive h to infinity.
    The log-probs are averaged over each response's tokens, the form IPO's
    authors report, so callers must pass averages, not sums.

    Source: Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences" (arXiv:2310.12036); beta here is their tau.

    Args:
        policy_chosen_logps: log pi(y_w|x) averaged over response tokens, (batch,).
        policy_rejected_logps: averaged log pi(y_l|x), (batch,).
        reference_chosen_logps: averaged log ref(y_w|x), (batch,).
        reference_rejected_logps: averaged log ref(y_l|x), (batch,).
        beta: regularisation strength tau, > 0; the target h is 1 / (2 beta).
    """
    h = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


def rebel_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    reward_differences: torch.Tensor,
) -> LossOutput:
    """REBEL: (h - (r_w - r_l) / beta)^2.

    Ratio matching: the target is the optimal policy's own log-ratio
    difference h* = (r(x, y_w) - r(x, y_l)) / beta, regressed with squared
    error. At the minimum the implicit reward margin beta * h equals the
    reward difference, so the policy matches pi* ~ ref * exp(r / beta) on
    every pair whose rewards are known.

    Source: Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing
    Relative Rewards" (arXiv:2404.16767); beta here is 1 / eta, which scales
    their squared error by beta^2 and leaves the minimiser unchanged.

    Args:
        policy_chosen_logps: log pi(y_w|x) summed over response tokens, (batch,).
        policy_rejected_logps: log pi(y_l|x), (batch,).
        reference_chosen_logps: log ref(y_w|x), (batch,).
        reference_rejected_logps: log ref(y_l|x), (batch,).
        beta: KL-regularisation strength, > 0; the target h is reward_differences / beta.
        reward_differences: r(x, y_w) - r(x, y_l) from a reward model, (batch,).
    """
    h = log_ratio_difference(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (h - reward_differences / beta) ** 2
    chosen_rewards, rejected_rewards = implicit_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    return LossOutput(losses, chosen_rewards, rejected_rewards)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what its caller must supply."""

    function: Callable[..., LossOutput]
    uses_rewards: bool  # needs reward_differences from the data
    average_logps: bool  # log-probs averaged over response tokens instead of summed
    options: tuple[str, ...] = ()  # extra keyword arguments read from the dpo config


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, uses_rewards=False, average_logps=False,
                        options=("label_smoothing",)),
    "hinge": LossSpec(hinge_loss, uses_rewards=False, average_logps=False),
    "ipo": LossSpec(ipo_loss, uses_rewards=False, average_logps=True),
    "rebel": LossSpec(rebel_loss, uses_rewards=True, average_logps=False),
}


def get_loss(loss_type: str) -> LossSpec:
    """Look up a loss by its `dpo.loss_type` name, raising ValueError for unknown names."""
    if loss_type not in LOSSES:
        valid = ", ".join(sorted(LOSSES))
        raise ValueError(
            f"Unknown dpo.loss_type={loss_type!r}. Valid loss types: {valid}. "
            f"Example: python dpo.py dpo.loss_type=sigmoid"
        )
    return LOSSES[loss_type]


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r(x, y_w) - r(x, y_l)), per pair.

    The negative log-likelihood of the preference label under the
    Bradley-Terry model P(y_w beats y_l) = sigmoid(r_w - r_l). It is computed
    as softplus(r_l - r_w), which stays finite for any margin. Only reward
    differences are identified, so a trained model's rewards carry an
    arbitrary per-prompt offset that REBEL's r_w - r_l cancels.

    Source: Ouyang et al. 2022, "Training language models to follow
    instructions with human feedback" (arXiv:2203.02155), eq. 1 with K = 2.

    Args:
        chosen_rewards: scalar reward of each chosen response, (batch,).
        rejected_rewards: scalar reward of each rejected response, (batch,).

    Returns:
        Per-pair losses, (batch,).
    """
    return F.softplus(rejected_rewards - chosen_rewards)
