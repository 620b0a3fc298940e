"""The losses against their formulas: hand-computed cases, closed forms, gradients."""

import math

import pytest
import torch

import losses


def logps_with_difference(h: list[float]):
    """Policy/reference log-probs whose log-ratio difference is exactly h (reference zero)."""
    h = torch.tensor(h, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    return h.clone(), zeros.clone(), zeros.clone(), zeros.clone()


def random_logps(seed: int, batch: int = 64):
    generator = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(batch, generator=generator, dtype=torch.float64) for _ in range(4)]


# ---------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------


def test_sigmoid_loss_hand_computed():
    # beta * h = ln 3, so sigma(beta h) = 3/4 and the loss is -ln(3/4).
    output = losses.sigmoid_loss(*logps_with_difference([math.log(3) / 2]), beta=2.0)
    assert output.losses.item() == pytest.approx(-math.log(0.75), abs=1e-12)


def test_sigmoid_label_smoothing_hand_computed():
    # -(3/4) ln(3/4) - (1/4) ln(1/4) at beta * h = ln 3 with eps = 1/4.
    output = losses.sigmoid_loss(*logps_with_difference([math.log(3)]), beta=1.0,
                                 label_smoothing=0.25)
    expected = -0.75 * math.log(0.75) - 0.25 * math.log(0.25)
    assert output.losses.item() == pytest.approx(expected, abs=1e-12)


def test_hinge_loss_hand_computed():
    output = losses.hinge_loss(*logps_with_difference([0.25, 1.0, -1.0]), beta=2.0)
    assert output.losses.tolist() == pytest.approx([0.5, 0.0, 3.0], abs=1e-12)


def test_ipo_loss_hand_computed():
    # beta = 0.5 puts the target at h = 1; h = 3 is 2 away, so the loss is 4.
    output = losses.ipo_loss(*logps_with_difference([3.0]), beta=0.5)
    assert output.losses.item() == pytest.approx(4.0, abs=1e-12)


def test_rebel_loss_hand_computed():
    # Reward difference 4 at beta 2 puts the target at h = 2; h = 5 gives 9.
    output = losses.rebel_loss(*logps_with_difference([5.0]), beta=2.0,
                               reward_differences=torch.tensor([4.0], dtype=torch.float64))
    assert output.losses.item() == pytest.approx(9.0, abs=1e-12)


def test_implicit_rewards_are_beta_times_log_ratio():
    output = losses.hinge_loss(
        torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-3.0]),
        beta=0.5,
    )
    assert output.chosen_rewards.item() == pytest.approx(0.5)
    assert output.rejected_rewards.item() == pytest.approx(-0.5)


# ---------------------------------------------------------------------------
# Formulas on random inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_formulas_on_random_inputs(seed):
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = random_logps(seed)
    beta, epsilon = 0.7, 0.1
    reward_differences = torch.randn(64, generator=torch.Generator().manual_seed(seed + 10),
                                     dtype=torch.float64)
    arguments = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)

    h = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(
        policy_chosen.tolist(), policy_rejected.tolist(), reference_chosen.tolist(),
        reference_rejected.tolist(), strict=True)]

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    expected = {
        "sigmoid": [-(1 - epsilon) * log_sigmoid(beta * v) - epsilon * log_sigmoid(-beta * v)
                    for v in h],
        "hinge": [max(0.0, 1 - beta * v) for v in h],
        "ipo": [(v - 1 / (2 * beta)) ** 2 for v in h],
        "rebel": [(v - d / beta) ** 2 for v, d in zip(h, reward_differences.tolist(), strict=True)],
    }
    computed = {
        "sigmoid": losses.sigmoid_loss(*arguments, beta=beta, label_smoothing=epsilon),
        "hinge": losses.hinge_loss(*arguments, beta=beta),
        "ipo": losses.ipo_loss(*arguments, beta=beta),
        "rebel": losses.rebel_loss(*arguments, beta=beta, reward_differences=reward_differences),
    }
    for name, output in computed.items():
        assert output.losses.tolist() == pytest.approx(expected[name], rel=1e-12, abs=1e-12), name


# ---------------------------------------------------------------------------
# Gradients and minima
# ---------------------------------------------------------------------------


def gradient_wrt_h(loss_type: str, h: float, beta: float, **options) -> float:
    """d(loss)/dh through the chosen policy log-prob, which enters h with sign +1."""
    policy_chosen = torch.tensor([h], dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, dtype=torch.float64)
    output = losses.get_loss(loss_type).function(policy_chosen, zeros, zeros, zeros, beta=beta,
                                                 **options)
    output.losses.sum().backward()
    return policy_chosen.grad.item()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_preference_losses_push_h_up_below_target(loss_type):
    # Below each target (h = 0 is below all three at beta = 1), descent raises h.
    assert gradient_wrt_h(loss_type, 0.0, beta=1.0) < 0


def test_rebel_gradient_pushes_h_toward_reward_target():
    rewards = {"reward_differences": torch.tensor([2.0], dtype=torch.float64)}
    assert gradient_wrt_h("rebel", 0.5, beta=1.0, **rewards) < 0  # below target 2
    assert gradient_wrt_h("rebel", 3.5, beta=1.0, **rewards) > 0  # above target 2


def test_ipo_gradient_pushes_h_down_above_target():
    assert gradient_wrt_h("ipo", 2.0, beta=1.0) > 0  # target is 0.5


def test_rejected_log_prob_gradient_has_opposite_sign():
    policy_rejected = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(1, dtype=torch.float64)
    output = losses.sigmoid_loss(zeros, policy_rejected, zeros, zeros, beta=1.0)
    output.losses.sum().backward()
    assert policy_rejected.grad.item() > 0  # descent lowers the rejected log-prob


def test_ipo_loss_minimised_at_target_margin():
    beta = 0.25
    target = 1 / (2 * beta)
    grid = torch.linspace(target - 1, target + 1, 201, dtype=torch.float64)
    values = losses.ipo_loss(*logps_with_difference(grid.tolist()), beta=beta).losses
    assert grid[values.argmin()].item() == pytest.approx(target)
    assert values.min().item() == pytest.approx(0.0, abs=1e-20)
    assert gradient_wrt_h("ipo", target, beta=beta) == pytest.approx(0.0, abs=1e-12)


def test_rebel_loss_minimised_at_reward_difference_over_beta():
    beta, reward_difference = 5.0, 3.0
    target = reward_difference / beta
    grid = torch.linspace(target - 1, target + 1, 201, dtype=torch.float64)
    rewards = torch.full_like(grid, reward_difference)
    values = losses.rebel_loss(*logps_with_difference(grid.tolist()), beta=beta,
                               reward_differences=rewards).losses
    assert grid[values.argmin()].item() == pytest.approx(target)
    assert values.min().item() == pytest.approx(0.0, abs=1e-20)


def test_label_smoothed_sigmoid_minimised_at_finite_margin():
    beta, epsilon = 2.0, 0.1
    target = math.log((1 - epsilon) / epsilon) / beta
    gradient = gradient_wrt_h("sigmoid", target, beta=beta, label_smoothing=epsilon)
    assert gradient == pytest.approx(0.0, abs=1e-12)


def test_hinge_loss_has_no_gradient_past_margin():
    assert gradient_wrt_h("hinge", 0.6, beta=2.0) == 0.0


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry_contains_four_losses():
    assert set(losses.LOSSES) == {"sigmoid", "hinge", "ipo", "rebel"}
    assert losses.LOSSES["ipo"].average_logps
    assert losses.LOSSES["rebel"].uses_rewards
    assert not losses.LOSSES["sigmoid"].uses_rewards


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError) as error:
        losses.get_loss("kto")
    message = str(error.value)
    assert "'kto'" in message
    assert "hinge, ipo, rebel, sigmoid" in message
