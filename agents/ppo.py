"""Recurrent PPO: clipped surrogate over minibatches of stored sequences."""

from __future__ import annotations

import numpy as np
import torch

from agents import distributed
from agents.optim import PolicyUpdater, gradient_step
from agents.storage import RolloutStorage


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] (nan when the returns do not vary)."""
    var = returns.var()
    return float("nan") if var == 0 else float(1 - (returns - values).var() / var)


def normalize_advantages(advantages: torch.Tensor, mode: bool | str, rollout: torch.Tensor,
                         std_floor: float = 0.0) -> torch.Tensor:
    """Advantages of a minibatch as the update uses them.

    :param advantages: the minibatch's advantages.
    :param mode: ``True`` (zero mean, unit scale within the minibatch), ``"batch"`` (the same with
        the mean and scale of the whole rollout) or ``False`` (as they are).
    :param rollout: every advantage of the rollout (read by ``"batch"``).
    :param std_floor: the smallest standard deviation divided by: advantages that spread less (a
        minibatch in which no reward was seen, only the value function's errors) are scaled up
        less than to unit scale. 0 divides by the standard deviation itself.
    """
    if mode == "batch":
        return (advantages - rollout.mean()) / (rollout.std().clamp_min(std_floor) + 1e-8)
    if mode and advantages.numel() > 1:
        return (advantages - advantages.mean()) / (advantages.std().clamp_min(std_floor) + 1e-8)
    return advantages


class RecurrentPPO(PolicyUpdater):
    """PPO update for a recurrent actor-critic (Schulman et al. 2017, with whole-sequence minibatches).

    ``algo`` is the resolved config section (lr, n_epochs, num_minibatches, seq_len, clip_range,
    clip_range_vf, ent_coef, vf_coef, max_grad_norm, normalize_advantage, advantage_std_floor,
    optimizer, optimizer_eps, target_kl); the constructor is ``PolicyUpdater``'s.
    """

    def update(self, storage: RolloutStorage) -> dict[str, float]:
        """Run ``n_epochs`` passes of minibatch updates over ``storage``; return the averaged statistics."""
        a = self.algo
        stats: dict[str, list[float]] = {key: [] for key in (
            "policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm")}
        first_logprob_error = None
        for _epoch in range(a["n_epochs"]):
            for batch in storage.minibatches(a["num_minibatches"], a["seq_len"], self.generator):
                log_probs, entropy, values = self.policy.evaluate_actions(
                    batch.obs, batch.actions, batch.initial_state, batch.episode_starts
                )
                log_ratio = log_probs - batch.log_probs
                if first_logprob_error is None:
                    # Before any gradient step the replay must reproduce the rollout exactly.
                    first_logprob_error = log_ratio.detach().abs().max().item()
                ratio = log_ratio.exp()
                advantages = normalize_advantages(batch.advantages, a["normalize_advantage"], storage.advantages,
                                                  a["advantage_std_floor"])

                policy_loss = torch.max(
                    -advantages * ratio, -advantages * ratio.clamp(1 - a["clip_range"], 1 + a["clip_range"])
                ).mean()
                if a["clip_range_vf"] is None:
                    value_loss = 0.5 * (batch.returns - values).pow(2).mean()
                else:
                    clipped = batch.values + (values - batch.values).clamp(-a["clip_range_vf"], a["clip_range_vf"])
                    value_loss = 0.5 * torch.max((batch.returns - values).pow(2),
                                                 (batch.returns - clipped).pow(2)).mean()
                entropy_mean = entropy.mean()
                loss = policy_loss - a["ent_coef"] * entropy_mean + a["vf_coef"] * value_loss
                grad_norm = gradient_step(self.optimizer, loss, a["max_grad_norm"])

                with torch.no_grad():
                    stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))
                    stats["clip_fraction"].append(float(((ratio - 1).abs() > a["clip_range"]).float().mean()))
                stats["policy_loss"].append(policy_loss.item())
                stats["value_loss"].append(value_loss.item())
                stats["entropy"].append(entropy_mean.item())
                stats["grad_norm"].append(grad_norm)
            # Under torchrun every rank must stop after the same epoch (the gradient all-reduce pairs
            # their steps), so the decision uses the KL averaged over ranks (unchanged in one process).
            if a["target_kl"] is not None and \
                    distributed.mean_over_ranks(np.mean(stats["approx_kl"][-a["num_minibatches"]:])) > a["target_kl"]:
                break
        result = {key: float(np.mean(values)) for key, values in stats.items()}
        result["first_logprob_error"] = first_logprob_error
        result["explained_variance"] = explained_variance(storage.values.flatten(), storage.returns.flatten())
        result["lr"] = self.optimizer.param_groups[0]["lr"]
        return result
