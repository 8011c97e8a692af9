"""Policies: recurrent cores, observation encoders, the actor-critic and checkpoint loading."""

from policies.actor_critic import RecurrentActorCritic, obs_to_tensor
from policies.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from policies.cores import CORES, BRIMs, GRUCore, LSTMCore, RecurrentCore, RIMs, ThalNet, make_core
from policies.encoders import make_encoder
from policies.policy import Policy, load_policy

__all__ = [
    "CORES",
    "BRIMs",
    "CheckpointError",
    "GRUCore",
    "LSTMCore",
    "Policy",
    "RIMs",
    "RecurrentActorCritic",
    "RecurrentCore",
    "ThalNet",
    "load_checkpoint",
    "load_policy",
    "make_core",
    "make_encoder",
    "obs_to_tensor",
    "save_checkpoint",
]
