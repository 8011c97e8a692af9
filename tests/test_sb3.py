"""This package's cores in sb3-contrib's RecurrentPPO (policies/sb3.py), on MiniGrid through SB3's make_vec_env."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from envs.minigrid import wrap_minigrid
from policies.checkpoint import CheckpointError
from policies.cores import CORES, make_core
from policies.encoders import GridEncoder
from policies.sb3 import CoreAsLSTM, EncoderFeaturesExtractor, RecurrentCorePolicy

REPO = Path(__file__).resolve().parent.parent
ENV_ID = "MiniGrid-DoorKey-5x5-v0"
N_ENVS = 2
N_STEPS = 32  # one rollout is N_STEPS * N_ENVS = 64 frames, one minibatch

# Small versions of every core. GRU 13 has an odd state (13 floats): its (h, c) halves carry a padding column.
CORE_KWARGS: dict[str, dict[str, Any]] = {
    "lstm": {"hidden_size": 16},
    "gru": {"hidden_size": 13},
    "rims": {"num_modules": 4, "module_size": 16, "k_active": 2},
    "brims": {"layers": [{"num_modules": 4, "module_size": 16, "k_active": 2},
                         {"num_modules": 3, "module_size": 12, "k_active": 2}]},
    "thalnet": {"num_modules": 3, "module_size": 12, "center_size_per_module": 4},
}
ALL_CORES = list(CORE_KWARGS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _sb3_logs_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without a log folder SB3's learn() makes an empty /tmp/SB3-<date> per model; keep them in the test's own.
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path / "sb3-logs"))


def test_every_core_is_covered() -> None:
    assert set(CORE_KWARGS) == set(CORES)


def make_env(seed: int = 0) -> VecEnv:
    """DoorKey-5x5 through SB3's own make_vec_env and this package's wrapper; short episodes keep evaluation quick."""
    return make_vec_env(ENV_ID, n_envs=N_ENVS, seed=seed, wrapper_class=wrap_minigrid, env_kwargs={"max_steps": 40})


def make_model(core: str, env: VecEnv, n_epochs: int = 2, **policy_kwargs: Any) -> RecurrentPPO:
    """A tiny RecurrentPPO with ``core``: one minibatch of one 64-frame rollout per epoch."""
    return RecurrentPPO(RecurrentCorePolicy, env, n_steps=N_STEPS, batch_size=N_STEPS * N_ENVS, n_epochs=n_epochs,
                        seed=0, policy_kwargs={"core": core, "core_kwargs": CORE_KWARGS[core], **policy_kwargs})


def random_state(policy: RecurrentCorePolicy, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A random non-zero (h, c) pair of the shape sb3-contrib carries, the padding column (if any) zero."""
    adapter = policy.lstm_actor
    flat = 0.5 * torch.randn(N_ENVS, adapter.state_size, generator=torch.Generator().manual_seed(seed))
    h, c = adapter.from_flat(flat)
    return h.numpy(), c.numpy()


def action_probs(policy: RecurrentCorePolicy, obs: np.ndarray, state: tuple[np.ndarray, np.ndarray],
                 starts: np.ndarray) -> torch.Tensor:
    """The actor's action probabilities for a batch of observations entering with ``state``."""
    obs_tensor, _ = policy.obs_to_tensor(obs)
    with torch.no_grad():  # SB3's device="auto" puts the policy on a GPU where there is one
        dist, _ = policy.get_distribution(obs_tensor, tuple(torch.as_tensor(s, device=policy.device) for s in state),
                                          torch.as_tensor(starts, dtype=torch.float32, device=policy.device))
    return dist.distribution.probs.cpu()


@pytest.mark.parametrize("name", ALL_CORES)
def test_learn_save_load_predict_evaluate(name: str, tmp_path: Path) -> None:
    env = make_env()
    model = make_model(name, env)
    adapter = model.policy.lstm_actor
    assert isinstance(adapter, CoreAsLSTM) and isinstance(adapter.core, CORES[name])
    assert isinstance(model.policy.lstm_critic, CoreAsLSTM) and model.policy.lstm_critic is not adapter
    # The grid reaches the policy channel first (SB3's VecTransposeImage) and this package's grid encoder reads it.
    assert model.policy.observation_space.shape == (3, 7, 7)
    assert isinstance(model.policy.features_extractor.encoder, GridEncoder)
    # The optimizer holds exactly the policy's parameters: the cores', none of the throwaway LSTMs'.
    in_optimizer = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.policy.parameters()}
    before = [p.detach().clone() for p in adapter.core.parameters()]

    model.learn(5 * N_STEPS * N_ENVS)  # 320 frames, 5 updates

    assert model.num_timesteps == 5 * N_STEPS * N_ENVS
    assert any(not torch.equal(a, p) for a, p in zip(before, adapter.core.parameters())), "the core did not train"
    for role in ("lstm_actor", "lstm_critic"):  # the last minibatch's gradients are still there
        missing = [n for n, p in getattr(model.policy, role).core.named_parameters()
                   if p.grad is None or torch.count_nonzero(p.grad) == 0]
        assert not missing, f"{role} parameters without gradient in a training step: {missing}"

    model.save(tmp_path / "model.zip")
    loaded = RecurrentPPO.load(tmp_path / "model.zip", env=env)
    assert isinstance(loaded.policy, RecurrentCorePolicy) and loaded.policy.core_kwargs == CORE_KWARGS[name]
    # Predict along an episode with state: the loaded model gives identical actions, states and probabilities.
    obs = env.reset()
    state = loaded_state = None
    starts = np.ones(N_ENVS, dtype=bool)
    for _ in range(6):
        entering = random_state(model.policy) if state is None else state  # all start at step 0: reset anyway
        loaded_entering = random_state(model.policy) if loaded_state is None else loaded_state
        probs = action_probs(model.policy, obs, entering, starts)
        loaded_probs = action_probs(loaded.policy, obs, loaded_entering, starts)
        assert torch.equal(probs, loaded_probs)
        action, state = model.predict(obs, state=state, episode_start=starts, deterministic=True)
        loaded_action, loaded_state = loaded.predict(obs, state=loaded_state, episode_start=starts, deterministic=True)
        np.testing.assert_array_equal(action, loaded_action)
        for s, ls in zip(state, loaded_state):
            assert s.shape == (1, N_ENVS, adapter.hidden_size)
            np.testing.assert_array_equal(s, ls)
        obs, _, starts, _ = env.step(action)

    mean_return, std_return = evaluate_policy(loaded, env, n_eval_episodes=2)
    assert 0.0 <= mean_return <= 1.0 and math.isfinite(std_return)


@pytest.mark.parametrize("name", ALL_CORES)
def test_episode_start_resets_to_the_initial_state(name: str) -> None:
    env = make_env()
    policy = make_model(name, env).policy
    obs = env.reset()
    carried = random_state(policy)
    # Env 0 starts an episode, env 1 carries its state on.
    _, state = policy.predict(obs, state=carried, episode_start=np.array([True, False]), deterministic=True)
    _, fresh = policy.predict(obs, state=None, episode_start=np.ones(N_ENVS, dtype=bool), deterministic=True)
    _, carried_on = policy.predict(obs, state=carried, episode_start=np.zeros(N_ENVS, dtype=bool), deterministic=True)
    for s, f, c in zip(state, fresh, carried_on):
        # Rounding may depend on the other rows of the batch (RIMs' kernel), hence a float32-ulp tolerance.
        np.testing.assert_allclose(s[:, 0], f[:, 0], rtol=0, atol=1e-6)  # reset: as from the initial state
        np.testing.assert_allclose(s[:, 1], c[:, 1], rtol=0, atol=1e-6)  # no reset: as carried on
        assert not np.array_equal(s[:, 1], f[:, 1])
    # The initial state predict() starts from is the core's own (zeros), and round-trips through (h, c).
    adapter = policy.lstm_actor
    initial = adapter.core.initial_state(N_ENVS)
    assert torch.equal(adapter.to_flat(adapter.from_flat(initial)), initial)
    assert policy.lstm_hidden_state_shape == (1, 1, adapter.hidden_size)
    assert adapter.hidden_size == math.ceil(adapter.state_size / 2)
    if adapter.padding:  # the padding column stays zero through a step
        assert np.all(state[1][..., -adapter.padding:] == 0.0)


@pytest.mark.parametrize("name", ALL_CORES)
def test_action_distribution_depends_on_the_core_state(name: str) -> None:
    env = make_env()
    policy = make_model(name, env).policy
    obs = env.reset()
    no_start = np.zeros(N_ENVS, dtype=bool)
    zero = tuple(np.zeros((1, N_ENVS, policy.lstm_actor.hidden_size), dtype=np.float32) for _ in range(2))
    from_zero = action_probs(policy, obs, zero, no_start)
    from_random = action_probs(policy, obs, random_state(policy), no_start)
    assert (from_zero - from_random).abs().max() > 1e-4


@pytest.mark.parametrize("name", ALL_CORES)
def test_one_core_call_matches_sb3_contrib_step_loop(name: str) -> None:
    # sb3-contrib's own _process_sequence (one-step calls, state * (1 - episode_start)) and the policy's (the
    # episode starts handed to the core, one call) compute the same thing: resets give the core's initial state.
    torch.manual_seed(0)
    adapter = CoreAsLSTM(make_core(name, 10, **CORE_KWARGS[name])).eval()
    n_seq, steps = 3, 5
    features = torch.randn(n_seq * steps, 10)
    starts = torch.zeros(n_seq, steps)
    starts[0, 0] = starts[1, 2] = starts[2, 4] = 1.0
    state = adapter.from_flat(0.5 * torch.randn(n_seq, adapter.state_size))
    with torch.no_grad():
        ours, ours_state = RecurrentCorePolicy._process_sequence(features, state, starts.flatten(), adapter)
        theirs, theirs_state = RecurrentActorCriticPolicy._process_sequence(features, state, starts.flatten(), adapter)
    assert ours.shape == (n_seq * steps, adapter.output_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours_state, theirs_state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("policy_kwargs", "critic_core"), [({"shared_lstm": True, "enable_critic_lstm": False}, False),
                                                            ({"enable_critic_lstm": False}, False)])
def test_critic_choices(policy_kwargs: dict[str, Any], critic_core: bool, tmp_path: Path) -> None:
    env = make_env()
    model = make_model("rims", env, n_epochs=1, **policy_kwargs)
    policy = model.policy
    assert (policy.lstm_critic is not None) == critic_core
    if not policy.shared_lstm:  # a feed-forward critic sized to the core's output
        assert policy.critic.out_features == policy.lstm_actor.output_size
    model.learn(N_STEPS * N_ENVS)
    missing = [n for n, p in policy.lstm_actor.core.named_parameters()
               if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, f"parameters without gradient: {missing}"
    # The policy alone (policy.save / RecurrentCorePolicy.load) keeps its core and critic choice.
    policy.save(tmp_path / "policy.pt")
    loaded = RecurrentCorePolicy.load(tmp_path / "policy.pt")
    assert (loaded.core_name, loaded.shared_lstm, loaded.lstm_critic is None) == ("rims", policy.shared_lstm, True)
    # Saved under one revision of the core's computation, loaded under another: refused, as load_policy does
    # (it loaded silently: SB3's saves did not record the revision).
    revision = CORES["rims"].revision
    try:
        CORES["rims"].revision = revision + 1
        with pytest.raises(CheckpointError, match=f"rims core of revision {revision}, and this version of the package "
                                                  f"computes revision {revision + 1}"):
            RecurrentCorePolicy.load(tmp_path / "policy.pt")
    finally:
        CORES["rims"].revision = revision
    obs, starts = env.reset(), np.ones(N_ENVS, dtype=bool)
    assert torch.equal(action_probs(policy, obs, random_state(policy), starts),
                       action_probs(loaded, obs, random_state(policy), starts))


@pytest.mark.parametrize(("policy_kwargs", "message"), [
    ({"core": "transformer"}, "core must be one of 'lstm', 'gru', 'rims', 'brims', 'thalnet'"),
    ({"core": "rims", "core_kwargs": {"num_modulez": 4}}, "bad argument for core 'rims'"),
    # The features width sets it: a TypeError ("multiple values for argument 'input_size'") before.
    ({"core": "lstm", "core_kwargs": {"input_size": 5}}, "bad argument for core 'lstm'.*input_size"),
    ({"core": "rims", "core_kwargs": {"k_active": 9}}, "k_active must be between 1 and num_modules"),
    ({"core": "gru", "normalize_images": True}, "normalize_images=True"),
    # sb3-contrib's own arguments: a TypeError and an AssertionError before.
    ({"core": "lstm", "lstm_hidden_size": 64}, "lstm_hidden_size belong.s. to sb3-contrib's LSTM; .* core_kwargs"),
    ({"core": "rims", "shared_lstm": True}, "shared_lstm=True needs enable_critic_lstm=False"),
])
def test_bad_core_arguments_are_one_clear_message(policy_kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RecurrentPPO(RecurrentCorePolicy, make_env(), n_steps=N_STEPS, policy_kwargs=policy_kwargs)


def test_extractor_reads_the_grid_in_either_layout() -> None:
    env = make_env()
    grid_space = env.observation_space  # (7, 7, 3) before SB3 transposes it
    obs = torch.as_tensor(env.reset()).float()
    torch.manual_seed(0)
    channel_last = EncoderFeaturesExtractor(grid_space)
    model = make_model("gru", env)
    channel_first = model.policy.features_extractor
    channel_first.load_state_dict(channel_last.state_dict())
    channel_first.cpu()  # SB3's device="auto" put it on a GPU where there is one
    torch.testing.assert_close(channel_first(obs.permute(0, 3, 1, 2)), channel_last(obs))


def test_missing_sb3_contrib_names_the_extra() -> None:
    code = ("import sys\nsys.modules['sb3_contrib'] = None  # as if not installed\n"
            "try:\n    import policies.sb3\nexcept ImportError as exc:\n    print(exc)\n"
            "else:\n    sys.exit('imported without sb3-contrib')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'pip install "modular-memory-rl[sb3]"' in result.stdout


@pytest.mark.parametrize("args", [["--frames", "0"], ["--threads", "0"]])
def test_peer_benchmark_refuses_bad_arguments_with_one_message(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "benchmarks/peer.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{args[0]} must be at least 1, got 0" in result.stderr.splitlines()[-1]
