"""Tests for the autoencoder, masking, the LoRA table and row-wise Adam."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from uclr_cli.models.autoencoder import AutoEncoder, mask_elements, mask_rows
from uclr_cli.models.lora import LoRAEmbedding
from uclr_cli.optim import RowAdam

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- AutoEncoder


def test_autoencoder_shapes_and_structure():
    """dim 6 -> 5 -> 3 -> 5 -> 6, ReLU only between hidden layers."""
    ae = AutoEncoder(6, [5, 3])
    x = torch.randn(4, 6, generator=_gen(0))
    assert ae.encode(x).shape == (4, 3)
    assert ae.decode(ae.encode(x)).shape == (4, 6)
    assert ae(x).shape == (4, 6)
    enc = [(m.in_features, m.out_features) for m in ae.encoder if isinstance(m, nn.Linear)]
    dec = [(m.in_features, m.out_features) for m in ae.decoder if isinstance(m, nn.Linear)]
    assert enc == [(6, 5), (5, 3)] and dec == [(3, 5), (5, 6)]
    assert [type(m) for m in ae.encoder] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [type(m) for m in ae.decoder] == [nn.Linear, nn.ReLU, nn.Linear]
    # the code is linear: it can be negative
    assert (ae.encode(torch.randn(64, 6, generator=_gen(1))) < 0).any()
    torch.testing.assert_close(ae(x), ae.decoder(ae.encoder(x)))


def test_autoencoder_single_hidden_layer():
    """hidden=[3]: one Linear each way, no ReLU."""
    ae = AutoEncoder(6, [3])
    assert [type(m) for m in ae.encoder] == [nn.Linear] and [type(m) for m in ae.decoder] == [nn.Linear]


def test_autoencoder_deterministic_under_seed():
    """Same torch.manual_seed -> identical weights; another seed -> different."""
    torch.manual_seed(3)
    a = AutoEncoder(6, [5, 3]).state_dict()
    torch.manual_seed(3)
    b = AutoEncoder(6, [5, 3]).state_dict()
    torch.manual_seed(4)
    c = AutoEncoder(6, [5, 3]).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- masking


@pytest.mark.parametrize(("n", "ratio"), [(10, 0.3), (7, 0.5), (100, 0.25), (9, 0.0), (4, 0.9)])
def test_mask_rows_exact_count(n, ratio):
    """Exactly round(ratio·n) whole rows zeroed; other rows untouched; input not modified."""
    x = torch.rand(n, 5, generator=_gen(0)) + 0.5  # no zeros in the input
    x0 = x.clone()
    y = mask_rows(x, ratio, _gen(1))
    zero_rows = (y == 0).all(dim=1)
    assert int(zero_rows.sum()) == int(round(ratio * n))
    assert ((y == 0) == zero_rows[:, None]).all()  # whole rows or nothing
    assert torch.equal(y[~zero_rows], x0[~zero_rows])
    assert torch.equal(x, x0)


def test_mask_rows_deterministic_and_varies():
    """Same generator seed -> same mask; different seeds -> (here) different masks."""
    x = torch.rand(50, 4, generator=_gen(0)) + 0.5
    a, b = mask_rows(x, 0.3, _gen(5)), mask_rows(x, 0.3, _gen(5))
    assert torch.equal(a, b)
    c = mask_rows(x, 0.3, _gen(6))
    assert not torch.equal(a, c)


def test_mask_elements_statistics_and_unmasked_unchanged():
    """~ratio of entries zeroed (5σ bound on 200k entries); unmasked entries bit-identical."""
    ratio = 0.3
    x = torch.rand(400, 500, generator=_gen(0)) + 0.5
    x0 = x.clone()
    y = mask_elements(x, ratio, _gen(2))
    zero = y == 0
    frac = zero.float().mean().item()
    sigma = (ratio * (1 - ratio) / x.numel()) ** 0.5
    assert abs(frac - ratio) < 5 * sigma
    assert torch.equal(y[~zero], x0[~zero])
    assert torch.equal(x, x0)
    # not whole rows: a row-wise mask would zero either all or none of a row
    per_row = zero.float().mean(dim=1)
    assert ((per_row > 0) & (per_row < 1)).all()
    # deterministic for the same seed
    assert torch.equal(y, mask_elements(x, ratio, _gen(2)))
    assert not torch.equal(y, mask_elements(x, ratio, _gen(3)))


def test_mask_elements_ratio_zero_is_identity():
    """ratio 0 masks nothing."""
    x = torch.rand(20, 7, generator=_gen(0)) + 0.5
    assert torch.equal(mask_elements(x, 0.0, _gen(1)), x)


# ---------------------------------------------------------------- LoRA


def _lora(n=20, m=8, rank=4, alpha=8.0, seed=0):
    base = torch.randn(n, m, generator=_gen(seed))
    return base, LoRAEmbedding(base, rank, alpha, gen=_gen(seed + 1))


def test_lora_fresh_equals_base():
    """B = 0 at start: rows, weight, merged and scores are exactly the base's."""
    base, lora = _lora()
    idx = torch.tensor([0, 3, 3, 19])
    assert torch.equal(lora.rows(idx), base[idx])
    assert torch.equal(lora.weight(), base)
    assert torch.equal(lora.merged(), base)
    items = torch.randn(30, 8, generator=_gen(9))
    assert torch.equal(lora.weight() @ items.T, base @ items.T)
    assert lora.scale == 2.0
    assert lora.lora_a.shape == (4, 8) and lora.lora_b.shape == (20, 4)


def test_lora_base_is_a_frozen_copy_not_a_parameter():
    """base is a buffer (in state_dict, not parameters) and a copy of the input."""
    base, lora = _lora()
    params = list(lora.parameters())
    assert len(params) == 2
    assert all(p is not lora.base for p in params)
    assert {id(p) for p in params} == {id(lora.lora_a), id(lora.lora_b)}
    assert "base" in dict(lora.named_buffers()) and "base" in lora.state_dict()
    assert lora.base.data_ptr() != base.data_ptr()
    assert not lora.base.requires_grad


def test_lora_training_changes_only_adapters():
    """A few Adam steps: base bit-identical, A and B moved, merged == base + scale·B·A."""
    base, lora = _lora()
    base0, a0, b0 = lora.base.clone(), lora.lora_a.detach().clone(), lora.lora_b.detach().clone()
    opt = torch.optim.Adam(lora.parameters(), lr=0.05)
    target = torch.randn(20, 8, generator=_gen(7))
    idx = torch.tensor([1, 2, 5, 11])
    for _ in range(4):
        loss = (lora.rows(idx) - target[idx]).pow(2).sum() + (lora.weight() - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(lora.base, base0) and torch.equal(lora.base, base)
    assert not torch.equal(lora.lora_a.detach(), a0)
    assert not torch.equal(lora.lora_b.detach(), b0)
    merged = lora.merged()
    assert not merged.requires_grad
    ref = base0 + lora.scale * (lora.lora_b.detach() @ lora.lora_a.detach())
    torch.testing.assert_close(merged, ref, rtol=0, atol=0)
    assert not torch.allclose(merged, base0)
    torch.testing.assert_close(lora.rows(idx).detach(), merged[idx])


# ---------------------------------------------------------------- RowAdam


def test_rowadam_matches_torch_adam_all_rows():
    """Every row touched every step: same trajectory as torch.optim.Adam over 5 steps."""
    lr, betas, eps = 0.01, (0.8, 0.95), 1e-6
    w0 = torch.randn(6, 3, generator=_gen(0), dtype=torch.float64)
    mine = w0.clone()
    ref = nn.Parameter(w0.clone())
    ra = RowAdam({"t": mine}, lr=lr, betas=betas, eps=eps)
    adam = torch.optim.Adam([ref], lr=lr, betas=betas, eps=eps)
    g = _gen(1)
    rows = torch.arange(6)
    for _ in range(5):
        grad = (
            torch.randn(6, 3, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 6, dtype=torch.float64)[:, None]
        )
        perm = torch.randperm(6, generator=g)  # row order in the update must not matter
        ra.step({"t": (rows[perm], grad[perm])})
        ref.grad = grad.clone()
        adam.step()
        torch.testing.assert_close(mine, ref.detach(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(mine, w0)


def test_rowadam_untouched_rows_and_tables_bit_identical():
    """Rows/tables not in updates keep their values and moments exactly."""
    a = torch.randn(8, 3, generator=_gen(0))
    b = torch.randn(5, 3, generator=_gen(1))
    a0, b0 = a.clone(), b.clone()
    ra = RowAdam({"a": a, "b": b}, lr=0.1)
    ra.step({"a": (torch.tensor([0, 1, 4, 6]), torch.randn(4, 3, generator=_gen(9)))})
    row0, m0, v0 = a[0].clone(), ra.m["a"][0].clone(), ra.v["a"][0].clone()
    assert not torch.equal(row0, a0[0])
    touched = torch.tensor([1, 4, 6])
    for s in range(2):
        ra.step({"a": (touched, torch.randn(3, 3, generator=_gen(10 + s)))})
    # row 0 was touched once, then not: lazy Adam leaves it (and its moments) alone
    assert torch.equal(a[0], row0) and torch.equal(ra.m["a"][0], m0) and torch.equal(ra.v["a"][0], v0)
    rest = torch.ones(8, dtype=torch.bool)
    rest[touched] = False
    rest[0] = False
    assert torch.equal(a[rest], a0[rest])
    assert not torch.equal(a[touched], a0[touched])
    assert (a[touched] != a0[touched]).all()
    assert torch.equal(b, b0)
    assert torch.equal(ra.m["a"][rest], torch.zeros(4, 3)) and torch.equal(ra.v["b"], torch.zeros(5, 3))
    assert ra.t == 3


def test_rowadam_lazy_rows_use_global_step():
    """A row first touched at step 3 is updated with bias corrections of t=3 (SparseAdam semantics)."""
    lr, (b1, b2), eps = 0.1, (0.9, 0.999), 1e-8
    w = torch.zeros(2, 1, dtype=torch.float64)
    ra = RowAdam({"w": w}, lr=lr)
    one = torch.ones(1, 1, dtype=torch.float64)
    ra.step({"w": (torch.tensor([0]), one)})
    ra.step({"w": (torch.tensor([0]), one)})
    ra.step({"w": (torch.tensor([1]), one * 2)})
    m, v = (1 - b1) * 2, (1 - b2) * 4
    expected = -lr * (m / (1 - b1**3)) / ((v / (1 - b2**3)) ** 0.5 + eps)
    torch.testing.assert_close(w[1, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_rowadam_state_round_trip(tmp_path):
    """Save state_tensors to safetensors, load into a fresh optimizer: continues bit-identically."""
    g = _gen(0)
    grads = [(torch.randperm(10, generator=g)[:4], torch.randn(4, 3, generator=g)) for _ in range(6)]
    w_ref = torch.randn(10, 3, generator=_gen(1))
    ref = RowAdam({"e": w_ref}, lr=0.05)
    for rows, gr in grads[:3]:
        ref.step({"e": (rows, gr)})
    path = tmp_path / "opt.safetensors"
    save_file({**ref.state_tensors(), "e": w_ref}, str(path))
    loaded = load_file(str(path))
    w_new = loaded["e"].clone()
    new = RowAdam({"e": w_new}, lr=0.05)
    new.load_state_tensors(loaded)
    assert new.t == 3
    for rows, gr in grads[3:]:
        ref.step({"e": (rows, gr)})
        new.step({"e": (rows, gr)})
    assert torch.equal(w_new, w_ref)
    assert torch.equal(new.m["e"], ref.m["e"]) and torch.equal(new.v["e"], ref.v["e"])
    # without the state, a fresh optimizer diverges (the check above can fail)
    w_cold = loaded["e"].clone()
    cold = RowAdam({"e": w_cold}, lr=0.05)
    for rows, gr in grads[3:]:
        cold.step({"e": (rows, gr)})
    assert not torch.equal(w_cold, w_ref)
