"""Per-run modulation (modulation.py): the runs found, the ops over them equal the per-token ones, and both
families' image-to-video forwards modulate per run instead of building per-token tensors."""

import pytest
import torch

from usp_infer import modulation
from usp_infer.ltx2 import model as ltx2
from usp_infer.ltx_video import model as ltx
from usp_infer.modulation import Runs, addcmul, apply, token_runs, unbind


def _i2v_index(batch: int = 2) -> torch.Tensor:
    """A shard of an image-to-video step: 6 first-frame tokens (row 0), 10 others (row 1), 3 pads (row 2)."""
    return torch.tensor([0] * 6 + [1] * 10 + [2] * 3).expand(batch, -1)


def test_token_runs_are_the_spans_where_no_row_changes():
    runs = token_runs(_i2v_index())
    assert runs.bounds == (0, 6, 16, 19)
    assert runs.first.tolist() == [[0, 1, 2]] * 2
    index = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])  # the rows change at different tokens: three runs
    runs = token_runs(index)
    assert runs.bounds == (0, 1, 2, 4) and runs.first.tolist() == [[0, 0, 1], [0, 1, 1]]
    assert token_runs(torch.zeros(3, 5, dtype=torch.long)).bounds == (0, 5)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "compiled-form"])
def test_ops_over_runs_equal_the_per_token_ops(monkeypatch, compiling):
    torch.manual_seed(0)
    index = _i2v_index()
    runs = token_runs(index)
    rows = torch.randn(3, 4, 8)  # K = 3 distinct rows of n = 4 vectors of width 8
    per_token = rows[index]  # (B, S, 4, 8): what the forwards gathered before
    shift, scale, gate, other = unbind(runs.gather(rows), -2)
    x, y = torch.randn(2, 19, 8), torch.randn(2, 19, 8)
    if compiling:  # the torch.cat form compiled graphs take
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(addcmul(shift, x, scale), torch.addcmul(per_token[:, :, 0], x, per_token[:, :, 1]))
    assert torch.equal(addcmul(x, y, gate), torch.addcmul(x, y, per_token[:, :, 2]))
    halved = apply(other, lambda t: t / 2)
    assert torch.equal(addcmul(y, x, halved), torch.addcmul(y, x, per_token[:, :, 3] / 2))
    per_row = torch.randn(2, 1, 8)  # a per-sample operand with a per-run one
    assert torch.equal(addcmul(per_row, x, scale), torch.addcmul(per_row, x, per_token[:, :, 1]))
    assert addcmul(shift, x.bfloat16(), scale).dtype == torch.float32  # promoted as torch.addcmul does


def test_runs_as_either_operand_and_the_result_dtype_is_torch_addcmuls():
    """A per-run vector as a (with a per-token c) or as c alone; the result takes the widest operand's dtype, c's
    included, as torch.addcmul does."""
    torch.manual_seed(0)
    index = _i2v_index()
    rows = torch.randn(3, 8)
    vec, per_token = token_runs(index).gather(rows), rows[index]  # (B, R, 8) per run, (B, S, 8) per token
    x, y = torch.randn(2, 19, 8), torch.randn(2, 19, 8)
    assert torch.equal(addcmul(vec, x, y), torch.addcmul(per_token, x, y))
    low = addcmul(x.bfloat16(), y.bfloat16(), vec)
    assert low.dtype == torch.float32 and torch.equal(low, torch.addcmul(x.bfloat16(), y.bfloat16(), per_token))


def _spy_runs(monkeypatch) -> list:
    seen = []
    real = modulation.addcmul

    def spy(a, b, c):
        seen.extend(t.values.shape[1] for t in (a, c) if isinstance(t, Runs))
        return real(a, b, c)

    for module in (ltx, ltx2, modulation):  # modulation: norm_modulate's torch path
        monkeypatch.setattr(module, "addcmul", spy)
    return seen


def test_ltx2_image_to_video_modulates_per_run(monkeypatch):
    """Two runs (the clean first frame, the rest) in every per-token modulation of an LTX-2 forward."""
    from test_ltx2_model import (
        CONFIGS,
        from_reference,
        make_inputs,
        make_reference,
        run_ours,
    )

    seen = _spy_runs(monkeypatch)
    model = from_reference(make_reference(CONFIGS["ltx2.3"]))
    run_ours(model, make_inputs(CONFIGS["ltx2.3"], batch=2, timestep="i2v"))
    # per block: self-attention, text queries, FFN (2 ops each), a2v (2) and its gate; 2 blocks; the output
    assert seen and set(seen) == {2} and len(seen) >= 2 * 9


def test_ltx_video_image_to_video_modulates_per_run(monkeypatch):
    from test_ltx import CONFIGS, from_reference, make_inputs, make_reference, run_ours

    seen = _spy_runs(monkeypatch)
    run_ours(from_reference(make_reference(CONFIGS["tiny"])), make_inputs(CONFIGS["tiny"], 2, "i2v", "ones"))
    # per block: attention and FFN, 2 ops each; 2 blocks; the output
    assert seen and set(seen) == {2} and len(seen) >= 2 * 4
