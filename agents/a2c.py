"""Recurrent A2C: one policy-gradient step per rollout over all stored sequences."""

from __future__ import annotations

from agents.optim import PolicyUpdater, gradient_step
from agents.ppo import explained_variance, normalize_advantages
from agents.storage import RolloutStorage


class RecurrentA2C(PolicyUpdater):
    """Advantage actor-critic (Mnih et al. 2016, synchronous) for a recurrent actor-critic.

    ``algo`` is the resolved config section (lr, ent_coef, vf_coef, max_grad_norm,
    normalize_advantage, advantage_std_floor, optimizer (RMSprop by default), optimizer_eps); the constructor is
    ``PolicyUpdater``'s.
    """

    def update(self, storage: RolloutStorage) -> dict[str, float]:
        """One gradient step on the whole rollout; return its statistics."""
        a = self.algo
        states = storage.states[0]
        log_probs, entropy, values = self.policy.evaluate_actions(
            storage.obs, storage.actions, states, storage.episode_starts
        )
        first_logprob_error = (log_probs - storage.log_probs).detach().abs().max().item()
        # One minibatch, the whole rollout: "batch" and true agree.
        advantages = normalize_advantages(storage.advantages, a["normalize_advantage"], storage.advantages,
                                         a["advantage_std_floor"])
        policy_loss = -(advantages * log_probs).mean()
        value_loss = 0.5 * (storage.returns - values).pow(2).mean()
        entropy_mean = entropy.mean()
        loss = policy_loss - a["ent_coef"] * entropy_mean + a["vf_coef"] * value_loss
        grad_norm = gradient_step(self.optimizer, loss, a["max_grad_norm"])
        return {
            "policy_loss": policy_loss.item(),
            "value_loss": value_loss.item(),
            "entropy": entropy_mean.item(),
            "grad_norm": grad_norm,
            "first_logprob_error": first_logprob_error,
            "explained_variance": explained_variance(storage.values.flatten(), storage.returns.flatten()),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
