"""eval.calibration: the hooked input statistics against a direct computation on a tiny model."""

import pytest
import torch
from torch import nn

from eval.calibration import collect_input_statistics


class TinyNet(nn.Module):
    """embed -> norm -> up -> relu -> down, and an `unused` linear that forward never calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.up = nn.Linear(6, 5)
        self.down = nn.Linear(5, 3)
        self.unused = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)  # active only in training mode: calibration must run in eval mode

    def forward(self, input_ids):
        h = self.drop(self.embed(input_ids))
        return self.down(torch.relu(self.up(self.norm(h))))

    def inputs(self, input_ids):
        """{module name: its input tokens [N, d] in float64}, computed directly in eval mode."""
        h = self.embed(input_ids)
        x_up = self.norm(h)
        x_down = torch.relu(self.up(x_up))
        return {name: t.reshape(-1, t.shape[-1]).double() for name, t in
                (("norm", h), ("up", x_up), ("down", x_down))}


@pytest.fixture
def net():
    return TinyNet()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 11, (2, 7), generator=g), torch.randint(0, 11, (3, 4), generator=g)]


def test_statistics_equal_a_direct_computation(net):
    batches = _batches()
    modules = {name: net.get_submodule(name) for name in ("down", "norm", "up")}
    net.train()
    stats = collect_input_statistics(net, modules, batches, ("xtx", "abs_mean", "sq_norm"), progress=False)
    assert net.training, "the caller's training mode is restored"
    assert all(not m._forward_pre_hooks for m in net.modules()), "every hook is removed"

    with torch.no_grad():
        net.eval()
        direct = [net.inputs(b) for b in batches]
    for name in modules:
        x = torch.cat([d[name] for d in direct])  # [N, d]
        s = stats[name]
        assert s.count == x.shape[0] == 2 * 7 + 3 * 4
        torch.testing.assert_close(s.xtx, x.T @ x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.abs_mean, x.abs().mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.sq_norm, (x ** 2).sum(0), rtol=1e-12, atol=1e-12)
        assert s.xtx.dtype == torch.float64 and s.xtx.device.type == "cpu"
    # order of first call in the forward pass, not the order of the dict
    assert [stats[n].order for n in ("norm", "up", "down")] == [0, 1, 2]
    assert list(stats) == ["down", "norm", "up"]


def test_only_what_was_asked_and_uncalled_modules(net):
    modules = {"up": net.up, ("layer", 0): net.down, "unused": net.unused}
    stats = collect_input_statistics(net, modules, _batches(), ("sq_norm",), progress=False)
    assert stats["up"].xtx is None and stats["up"].abs_sum is None
    assert stats[("layer", 0)].sq_norm.shape == (5,)
    never = stats["unused"]
    assert never.count == 0 and never.order == -1
    assert torch.equal(never.sq_norm, torch.zeros(4, dtype=torch.float64))


def test_dict_batches_match_tensor_batches(net):
    batches = _batches()
    by_tensor = collect_input_statistics(net, {"up": net.up}, batches, ("xtx",), progress=False)
    by_dict = collect_input_statistics(net, {"up": net.up}, [{"input_ids": b} for b in batches], ("xtx",),
                                       progress=False)
    assert torch.equal(by_tensor["up"].xtx, by_dict["up"].xtx)


def test_unknown_statistic_is_refused(net):
    with pytest.raises(ValueError, match="unknown calibration statistics.*xtx, abs_mean, sq_norm"):
        collect_input_statistics(net, {"up": net.up}, _batches(), ("xtx", "mean"), progress=False)


def test_calibration_texts_hold_out_the_last_tenth_or_the_given_text(tmp_path):
    from eval.calibration import calibration_texts
    from eval.errors import UserInputError

    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(20):
        (folder / f"doc{i:02d}.txt").write_text(f"document {i}\n" * 3)
    calib, held_out, source = calibration_texts("some/model", folder)
    assert len(calib) == 18 and len(held_out) == 2 and not set(calib) & set(held_out)
    assert source == f"last 2 documents of {folder} (held out from calibration)"
    (tmp_path / "eval.txt").write_text("held out\n")
    calib, held_out, source = calibration_texts("some/model", folder, tmp_path / "eval.txt")
    assert len(calib) == 20 and held_out == ["held out\n"] and source == str(tmp_path / "eval.txt")
    with pytest.raises(UserInputError, match="^calib .* is required for models other than ref-lm") as info:
        calibration_texts("some/model")
    assert info.value.field == "calib"
    (tmp_path / "one.txt").write_text("only one document\n")
    with pytest.raises(UserInputError, match="^eval_text .* is needed"):
        calibration_texts("some/model", tmp_path / "one.txt")

