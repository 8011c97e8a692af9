"""agents.optim's Adam and RMSprop: bit-for-bit torch.optim's updates and state-dict format, without torch._dynamo."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from agents.optim import Adam, RMSprop, gradient_step, make_optimizer, set_learning_rate

REPO = Path(__file__).resolve().parents[1]

# name -> (ours, torch's), with this package's settings.
PAIRS = {
    "adam": (lambda ps, lr: Adam(ps, lr=lr, eps=1e-5), lambda ps, lr: torch.optim.Adam(ps, lr=lr, eps=1e-5)),
    "rmsprop": (lambda ps, lr: RMSprop(ps, lr=lr, alpha=0.99, eps=1e-5),
                lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-5)),
}


class Tiny(nn.Module):
    """Several parameter shapes: matrices, vectors, a 3-d tensor, a scalar, and one that never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.cube = nn.Parameter(torch.randn(2, 3, 7))
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.unused = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.lin(x))
        return (self.scale * torch.einsum("bh,cdh->bcd", h, self.cube)).square().mean()


def _twins(name: str, lr: float = 3e-3) -> tuple[Tiny, Tiny, object, torch.optim.Optimizer]:
    torch.manual_seed(0)
    ours_model = Tiny()
    torch_model = copy.deepcopy(ours_model)
    make_ours, make_torch = PAIRS[name]
    return ours_model, torch_model, make_ours(list(ours_model.parameters()), lr), \
        make_torch(list(torch_model.parameters()), lr)


def _step(model: Tiny, optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(x).backward()
    optimizer.step()


def _assert_same(ours_model: Tiny, torch_model: Tiny, ours, theirs) -> None:
    for (name, a), b in zip(ours_model.named_parameters(), torch_model.parameters()):
        assert torch.equal(a, b), f"parameter {name} differs"
    ours_sd, torch_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd["param_groups"] == torch_sd["param_groups"]
    assert list(ours_sd["param_groups"][0]) == list(torch_sd["param_groups"][0])  # same keys, same order
    assert list(ours_sd["state"]) == list(torch_sd["state"])
    for index, state in torch_sd["state"].items():
        assert list(ours_sd["state"][index]) == list(state)
        for key, value in state.items():
            mine = ours_sd["state"][index][key]
            assert mine.dtype == value.dtype and mine.shape == value.shape and torch.equal(mine, value), (index, key)


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_bit_for_bit_with_torch_over_steps_and_lr_changes(name: str) -> None:
    ours_model, torch_model, ours, theirs = _twins(name)
    generator = torch.Generator().manual_seed(1)
    for i in range(20):
        x = torch.randn(6, 5, generator=generator) * (1 + i)  # gradients of changing size
        for optimizer in (ours, theirs):
            set_learning_rate(optimizer, 3e-3 * (1 - i / 20))  # linear annealing, as the trainer does
        _step(ours_model, ours, x)
        _step(torch_model, theirs, x)
        _assert_same(ours_model, torch_model, ours, theirs)
    assert ours.param_groups[0]["lr"] == theirs.param_groups[0]["lr"]
    assert ours_model.unused.grad is None and id(ours_model.unused) not in {id(p) for p in ours.state}
    if name == "adam":  # the flat path ran: the states are views of one flat tensor
        assert ours._packed is not None and ours.state[ours_model.cube]["exp_avg"]._base is ours._packed.exp_avg


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_round_trip_with_torch(name: str, direction: str, tmp_path: Path) -> None:
    """A checkpoint written by one class resumes in the other, and both go on identically."""
    make_ours, make_torch = PAIRS[name]
    make_writer, make_reader = (make_ours, make_torch) if direction == "ours_to_torch" else (make_torch, make_ours)
    torch.manual_seed(0)
    model = Tiny()
    writer = make_writer(list(model.parameters()), 1e-2)
    generator = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 5, generator=generator) for _ in range(10)]
    for x in xs[:5]:
        _step(model, writer, x)
    set_learning_rate(writer, 4e-3)
    # Through a file, as checkpoints are written and read (weights_only, like policies.checkpoint).
    torch.save({"model": model.state_dict(), "optimizer": writer.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed = Tiny()
    resumed.load_state_dict(saved["model"])
    reader = make_reader(list(resumed.parameters()), 1.0)  # the saved lr replaces this one
    reader.load_state_dict(saved["optimizer"])
    assert reader.param_groups[0]["lr"] == 4e-3
    assert reader.state_dict()["param_groups"] == writer.state_dict()["param_groups"]
    for x in xs[5:]:
        _step(model, writer, x)
        _step(resumed, reader, x)
        if direction == "ours_to_torch":
            _assert_same(model, resumed, writer, reader)
        else:
            _assert_same(resumed, model, reader, writer)


def test_load_copies_state_and_refuses_what_it_does_not_implement() -> None:
    torch.manual_seed(0)
    model = Tiny()
    theirs = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-5)
    _step(model, theirs, torch.randn(3, 5))
    ours = Adam(model.parameters(), lr=1e-3, eps=1e-5)
    saved = theirs.state_dict()
    ours.load_state_dict(saved)
    assert all(s is not saved["state"][0][k] for k, s in ours.state_dict()["state"][0].items())  # no aliasing

    for key, value in [("amsgrad", True), ("weight_decay", 0.01), ("maximize", True)]:
        bad = copy.deepcopy(saved)
        bad["param_groups"][0][key] = value
        with pytest.raises(ValueError, match=key):
            Adam(model.parameters(), lr=1e-3, eps=1e-5).load_state_dict(bad)
    with pytest.raises(ValueError, match="momentum"):
        rms = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)
        RMSprop(model.parameters(), lr=1e-3, eps=1e-5).load_state_dict(rms.state_dict())
    with pytest.raises(ValueError, match="size"):
        Adam(list(model.parameters())[:2], lr=1e-3, eps=1e-5).load_state_dict(saved)
    with pytest.raises(ValueError):  # Adam's state is not RMSprop's
        RMSprop(model.parameters(), lr=1e-3, eps=1e-5).load_state_dict(saved)

    # An older torch's group without the newer keys loads, and they read as off.
    old = copy.deepcopy(saved)
    for key in ("fused", "decoupled_weight_decay", "capturable", "differentiable", "foreach", "maximize"):
        del old["param_groups"][0][key]
    ours = Adam(model.parameters(), lr=1e-3, eps=1e-5)
    ours.load_state_dict(old)
    assert ours.state_dict()["param_groups"] == saved["param_groups"]


def test_zero_grad_and_make_optimizer() -> None:
    model = Tiny()
    optimizer = make_optimizer(model.parameters(), "rmsprop", 7e-4, 1e-5)
    assert isinstance(optimizer, RMSprop) and optimizer.param_groups[0]["alpha"] == 0.99
    assert isinstance(make_optimizer(model.parameters(), "adam", 1e-3, 1e-5), Adam)
    with pytest.raises(ValueError, match="sgd"):
        make_optimizer(model.parameters(), "sgd", 1e-3, 1e-5)
    with pytest.raises(ValueError, match="empty"):
        make_optimizer([], "adam", 1e-3, 1e-5)
    model(torch.randn(2, 5)).backward()
    optimizer.zero_grad(set_to_none=False)
    assert torch.count_nonzero(model.lin.weight.grad) == 0 and model.unused.grad is None
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_gradient_step_clips_like_before(name: str) -> None:
    """gradient_step with our optimisers equals clip_grad_norm_ + step with torch.optim's, step after step."""
    ours_model, torch_model, ours, theirs = _twins(name)
    generator = torch.Generator().manual_seed(3)
    for i in range(6):
        x = torch.randn(6, 5, generator=generator) * (10 if i % 2 else 0.1)  # clipped, then not
        norm = gradient_step(ours, ours_model(x), max_grad_norm=0.5)
        theirs.zero_grad()
        torch_model(x).backward()
        assert norm == float(torch.nn.utils.clip_grad_norm_(list(torch_model.parameters()), 0.5))
        theirs.step()
        _assert_same(ours_model, torch_model, ours, theirs)


def test_adam_with_parameters_that_miss_gradients_at_some_steps() -> None:
    """Adam packs the state of the parameters with gradients into flat tensors; a parameter that has a
    gradient only at some steps (its own step count) must still update exactly as torch.optim's does."""
    ours_model, torch_model, ours, theirs = _twins("adam")
    generator = torch.Generator().manual_seed(4)
    for i in range(8):
        x = torch.randn(6, 5, generator=generator)
        for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
            optimizer.zero_grad(set_to_none=True)
            loss = model(x) + (model.unused.square().sum() if i in (2, 3, 6) else 0)
            loss.backward()
            optimizer.step()
        _assert_same(ours_model, torch_model, ours, theirs)


def test_building_and_stepping_does_not_import_dynamo() -> None:
    """torch.optim's first call imports torch._dynamo (seconds of start-up); ours must not."""
    code = (
        "import sys, torch\n"
        "from agents.optim import make_optimizer, gradient_step\n"
        "m = torch.nn.Linear(3, 2)\n"
        "for name in ('adam', 'rmsprop'):\n"
        "    opt = make_optimizer(m.parameters(), name, 1e-3, 1e-5)\n"
        "    gradient_step(opt, m(torch.ones(4, 3)).sum(), 0.5)\n"
        "    opt.load_state_dict(opt.state_dict())\n"
        "heavy = sorted(k for k in ('torch._dynamo', 'sympy') if k in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
