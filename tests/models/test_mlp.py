"""The engagement MLP: shapes, the sparse first layer, normalization, batched inference."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from sketchstream.models.errors import ModelError
from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs, assemble, code_indices

torch.set_num_threads(1)


def _inputs(n: int = 64, n_dense: int = 5, m: int = 2, d: int = 3, w: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, n_dense)).astype(np.float32)
    codes = rng.integers(-1, w, size=(n, m, d)).astype(np.int16)
    return MLPInputs(dense=dense, codes=codes)


def _config(**kw) -> MLPConfig:
    base = dict(n_dense=5, modalities=2, depth=3, width=8, hidden=16, blocks=2, heads=("a", "b"))
    base.update(kw)
    return MLPConfig(**base)


def test_predict_returns_one_probability_per_head():
    model = EngagementMLP(_config())
    p = model.predict(_inputs(), batch_size=10)
    assert p.shape == (64, 2) and p.dtype == np.float32
    assert np.all((p > 0) & (p < 1))


def test_predict_is_independent_of_batch_size():
    model = EngagementMLP(_config())
    x = _inputs()
    np.testing.assert_allclose(model.predict(x, batch_size=7), model.predict(x), atol=1e-6)


def test_forward_matches_dense_one_hot_first_layer():
    cfg = _config(n_dense=0, blocks=0)
    model = EngagementMLP(cfg)
    codes = torch.tensor([[[0, 7, -1], [3, -1, 2]]])
    idx = code_indices(codes, cfg.width)
    one_hot = torch.zeros(1, cfg.n_codes + 1)
    one_hot[0, idx[0]] = 1.0
    manual = one_hot @ model.codes_in.weight + model.bias_in
    manual = model.head(model.act_in(model.norm_in(manual)))
    torch.testing.assert_close(model(torch.zeros(1, 0), codes), manual)


def test_unknown_codes_hit_the_zero_padding_row():
    cfg = _config()
    idx = code_indices(torch.full((2, 2, 3), -1, dtype=torch.int16), cfg.width)
    assert torch.all(idx == cfg.n_codes)
    model = EngagementMLP(cfg)
    assert torch.all(model.codes_in.weight[cfg.n_codes] == 0)


def test_normalization_is_a_buffer_saved_with_the_weights():
    model = EngagementMLP(_config())
    x = _inputs()
    model.set_normalization(x.dense * 10 + 3)
    state = model.state_dict()
    assert "dense_mean" in state and "dense_std" in state
    np.testing.assert_allclose(state["dense_mean"].numpy(), (x.dense * 10 + 3).mean(0), rtol=1e-4)


def test_wrong_dense_width_is_refused_with_the_expected_shape():
    model = EngagementMLP(_config())
    x = _inputs(n_dense=4)
    with pytest.raises(ModelError, match=r"expects \(n, 5\)"):
        model.predict(x)


def test_config_round_trips_through_a_dict():
    cfg = _config(dense_names=tuple("abcde"))
    assert MLPConfig.from_dict(cfg.to_dict()) == cfg


def test_config_refuses_no_heads():
    with pytest.raises(ModelError, match="head"):
        _config(heads=())


def test_assemble_concatenates_density_log_counts_and_item_stats():
    n = 4
    features = SimpleNamespace(
        density=np.ones((n, 3), np.float32),
        counts=np.full((n, 2), np.e - 1, np.float32),
        item_codes=np.zeros((n, 2, 3), np.int16),
    )
    stats = np.full((n, 1), 7.0, np.float32)
    x = assemble(features, stats)
    assert x.dense.shape == (n, 6)
    np.testing.assert_allclose(x.dense[0], [1, 1, 1, 1, 1, 7], rtol=1e-6)
    assert x.codes.shape == (n, 2, 3)


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(0)
    x = _inputs(n=256)
    y = torch.from_numpy((x.dense[:, :1] > 0).astype(np.float32)).repeat(1, 2)
    model = EngagementMLP(_config(dropout=0.0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    dense, codes = torch.from_numpy(x.dense), torch.from_numpy(x.codes.astype(np.int64))
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, codes), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_quantile_block_reads_each_column_as_its_training_cdf():
    model = EngagementMLP(_config(n_dense=2, quantiles=4))
    train = np.column_stack([np.arange(9.0), np.zeros(9)]).astype(np.float32)  # col 1: constant
    model.set_normalization(train)
    assert model.state_dict()["dense_knots"].shape == (2, 5)  # saved with the weights
    block = model._dense_block(torch.tensor([[-5.0, 0.0], [2.0, 0.0], [4.0, 0.0], [99.0, 0.0]]))
    cdf = block[:, 2:] / np.sqrt(12.0) + 0.5
    # knots of column 0 are 0, 2, 4, 6, 8: below the range 0, at 2 a quarter, above it 1
    torch.testing.assert_close(cdf[:, 0], torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert torch.all(cdf[:, 1] == cdf[0, 1])  # a constant column reads one value
    assert block.shape == (4, 4)


def test_binned_columns_enter_piecewise_linearly_between_their_training_quantiles():
    model = EngagementMLP(_config(n_dense=3, quantiles=4, bins=2, binned=(0, 2)))
    train = np.column_stack([np.arange(9.0), np.full(9, 7.0), np.r_[np.zeros(6), 1, 2, 3]])
    model.set_normalization(train.astype(np.float32))
    x = torch.tensor([[-5.0, 7.0, 0.0], [2.0, 7.0, 0.5], [4.0, 7.0, 1.0], [7.0, 7.0, 9.0]])
    block = model._dense_block(x)
    assert block.shape == (4, 3 * 2 + 2 * 2)
    binned = block[:, 6:]
    # column 0: knots 0, 2, 4, 6, 8, bins [0, 4) and [4, 8): 0 below, linear inside, 1 above
    torch.testing.assert_close(binned[:, :2], torch.tensor([[0, 0], [0.5, 0], [1, 0], [1, 0.75]]))
    # column 2: knots 0, 0, 0, 1, 3: its first bin has no width (a step at 0), then [0, 3)
    torch.testing.assert_close(
        binned[:, 2:], torch.tensor([[1, 0], [1, 1 / 6], [1, 1 / 3], [1, 1]])
    )
    assert "binned_index" not in model.state_dict()  # the config says which: not saved twice
    again = EngagementMLP(MLPConfig.from_dict(model.config.to_dict()))
    again.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(again._dense_block(x), block)


def test_config_refuses_bins_it_cannot_place():
    with pytest.raises(ModelError, match="bins=8"):
        _config(quantiles=4, bins=8, binned=(0,))
    with pytest.raises(ModelError, match="bins=2"):
        _config(quantiles=0, bins=2, binned=(0,))
    with pytest.raises(ModelError, match="binned"):
        _config(quantiles=4, bins=2, binned=(5,))
    with pytest.raises(ModelError, match="binned"):
        _config(quantiles=4, bins=2, binned=(1, 1))


def test_config_refuses_one_quantile_and_no_members():
    with pytest.raises(ModelError, match="quantiles=1"):
        _config(quantiles=1)
    with pytest.raises(ModelError, match="members=0"):
        _config(members=0)


def test_an_ensemble_averages_its_members_logits():
    model = EngagementMLP(_config(members=3))
    x = _inputs()
    model.set_normalization(x.dense)
    dense, codes = torch.from_numpy(x.dense), torch.from_numpy(x.codes.astype(np.int64))
    model.eval()
    each = model.member_logits(dense, codes)
    assert each.shape == (3, 64, 2)
    assert not torch.allclose(each[0], each[1])  # members start from their own weights
    torch.testing.assert_close(model(dense, codes), each.mean(dim=0))


def test_an_ensemble_round_trips_through_its_state_dict():
    cfg = _config(members=2, quantiles=8, bins=4, binned=(0, 2))
    model = EngagementMLP(cfg)
    x = _inputs()
    model.set_normalization(x.dense)
    again = EngagementMLP(MLPConfig.from_dict(cfg.to_dict()))
    again.load_state_dict(model.state_dict(), strict=True)
    np.testing.assert_array_equal(again.predict(x), model.predict(x))


def test_user_rate_columns_read_like_rates_off_the_channel_masses():
    from sketchstream.models.mlp import user_rate_columns

    names = (
        "density/pos", "density/neg", "density/top",
        "mass/pos", "mass/neg", "mass/top", "hours_since_last", "events",
    )  # fmt: skip
    features = SimpleNamespace(
        valid=np.ones(2, bool),
        names=names,
        density=np.array([[0.5, 0.25, 0.0], [0.0, 0.0, 0.0]], np.float32),
        counts=np.array([[6.0, 2.0, 3.0, 1.0, 8.0], [0.0, 0.0, 0.0, 0.0, 0.0]], np.float32),
        item_codes=np.zeros((2, 1, 3), np.int16),
    )
    cols, col_names = user_rate_columns(features)
    assert col_names == ["rate/pos", "rate_near/pos", "share/top"]
    # 6 liked of 8; near the item 0.5*6 liked vs 0.25*2 not; 3 of the 8 at the top level
    np.testing.assert_allclose(cols[0], [6 / 8, 3 / 3.5, 3 / 8], rtol=1e-6)
    np.testing.assert_array_equal(cols[1], [0, 0, 0])  # a new user: zeros, not nan
    x = assemble(features, user_rates=True)
    assert x.dense.shape == (2, 3 + 5 + 3)


def test_user_rate_columns_go_pair_by_pair_and_take_no_rows():
    from sketchstream.models.mlp import user_rate_columns

    chans = ("pos", "neg", "pos_recent", "neg_recent", "top")
    names = tuple(f"density/{c}" for c in chans) + tuple(f"mass/{c}" for c in chans)
    density = np.array([[0.5, 0.5, 1.0, 0.0, 0.0]], np.float32)
    counts = np.array([[3.0, 1.0, 1.0, 4.0, 2.0, 0.0, 0.0]], np.float32)

    def features(rows: slice) -> SimpleNamespace:
        return SimpleNamespace(
            valid=np.ones(1, bool)[rows], names=names, density=density[rows], counts=counts[rows]
        )

    cols, col_names = user_rate_columns(features(slice(None)))
    assert col_names == [
        "rate/pos", "rate_near/pos", "rate/pos_recent", "rate_near/pos_recent", "share/top",
    ]  # fmt: skip
    # pos 3 of 4 (near: 1.5 of 2); pos_recent 1 of 5 (near: 1 of 1); top 2 of pos + neg's 4
    np.testing.assert_allclose(cols[0], [3 / 4, 1.5 / 2, 1 / 5, 1.0, 2 / 4], rtol=1e-6)
    empty, _ = user_rate_columns(features(slice(0, 0)))
    assert empty.shape == (0, 5) and empty.dtype == np.float32


@pytest.mark.parametrize(
    "kw",
    [
        {"quantiles": 0},  # standardized dense and codes
        {"quantiles": 8, "bins": 4, "binned": (1, 3, 4)},  # CDF and bins, codes
        {"n_dense": 0},  # codes only
        {"modalities": 0, "quantiles": 16, "bins": 16, "binned": (0,)},  # dense only
        {"quantiles": 8, "members": 3, "blocks": 0},  # an ensemble without blocks
    ],
)
def test_predict_outside_torch_equals_the_torch_forward(monkeypatch, kw):
    """``predict``'s compiled forward (kernels on) against torch's (kernels off), on inputs
    with ties to the knots, values outside them, unknown codes and codes past the width."""
    from sketchstream.models import kernels

    cfg = _config(**kw)
    model = EngagementMLP(cfg)
    x = _inputs(n=300, n_dense=cfg.n_dense, seed=1)
    dense = x.dense * 3.0
    dense[:, : min(2, cfg.n_dense)] = np.round(dense[:, : min(2, cfg.n_dense)])  # ties
    codes = x.codes.copy()
    codes[::7, 0, 0] = cfg.width + 3  # past the width: the last row, as code_indices clamps
    if cfg.n_dense:
        model.set_normalization(dense[:200])
        dense[-5:] = 1e6  # above every knot
    with torch.no_grad():  # move every parameter off its initial value (zero biases, unit gains)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = MLPInputs(dense=dense, codes=codes)
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = model.predict(x)
    model.eval()
    with torch.inference_mode():
        torch_logits = model(torch.from_numpy(dense), torch.from_numpy(codes.astype(np.int64)))
    model.train()  # predict in either path turns dropout off by itself
    np.testing.assert_allclose(reference, torch.sigmoid(torch_logits).numpy(), atol=1e-7)
    monkeypatch.setattr(kernels, "ENABLED", True)
    compiled = model.predict(x, batch_size=64)
    np.testing.assert_allclose(compiled, reference, atol=1e-6, rtol=0)
    assert model.training  # predict leaves the mode as it found it


def _fixed_model(seed: int = 0, products: str = "fixed16", **kw) -> tuple[EngagementMLP, MLPInputs]:
    """A calibrated fixed-point model (parameters moved off their initial values) and 300
    rows of inputs, the first 200 its calibration rows."""
    torch.manual_seed(seed)
    cfg = _config(products=products, quantiles=8, bins=4, binned=(1, 3), hidden=32, **kw)
    model = EngagementMLP(cfg)
    x = _inputs(n=300, n_dense=cfg.n_dense, seed=seed)
    x = MLPInputs(dense=x.dense * 3.0, codes=x.codes)
    model.set_normalization(x.dense[:200])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.calibrate_products(x.take(slice(0, 200)))
    return model, x


def _layer_checked(kind: type, seed: int, rows: int) -> tuple[Any, ...]:
    """A ``kind`` layer (``FixedLayer`` or ``Int8Layer``) of random 24 x 40 weights at the
    scales of ``rows`` random inputs; its compiled product checked against its torch
    reference and against itself cut into batches of 7, to the bit. Returns ``(layer, w, x,
    scale, out)``."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(24, 40)).astype(np.float32)
    x = (rng.normal(size=(rows, 40)) * rng.uniform(0.1, 10.0, size=40)).astype(np.float32)
    scale = (np.abs(x).max(axis=0) * 2.0 / 127.0).astype(np.float32)
    layer = kind.from_weights(w, scale)
    out = np.empty((rows, 24), np.float32)
    layer.product(x, out)
    np.testing.assert_array_equal(out, layer.reference(torch.from_numpy(x)).numpy())
    parts = np.empty_like(out)
    for start in range(0, rows, 7):
        layer.product(x[start : start + 7], parts[start : start + 7])
    np.testing.assert_array_equal(parts, out)
    return layer, w, x, scale, out


def test_fixed_product_is_exact_integer_arithmetic_on_two_digits():
    """``FixedLayer``: the compiled product equals its torch reference to the bit (the same
    digits, exact integer sums), is independent of the rows it is batched with, is within
    the digits' precision of the float64 product, and clips beyond the scale's range."""
    from sketchstream.models.mlp import FixedLayer

    layer, w, x, scale, out = _layer_checked(FixedLayer, seed=3, rows=500)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = np.abs(x).max(axis=0) @ np.abs(w).T / 10_000  # 16 bits less the 2x headroom
    assert np.all(np.abs(out - exact) <= bound), np.abs(out - exact).max()
    far = x[:1] * 0 + np.float32(1e6) * np.sign(w[0])  # far beyond every column's range
    clipped = np.empty((1, 24), np.float32)
    layer.product(far.astype(np.float32), clipped)
    edge = (127.0 * scale.astype(np.float64) * np.sign(w[0])) @ w.T.astype(np.float64)
    np.testing.assert_allclose(clipped[0], edge, rtol=1e-3)


def test_int8_product_is_exact_integer_arithmetic_on_int8_weights(monkeypatch):
    """``Int8Layer``: the compiled product (digits stacked through one int8 product) equals
    its torch reference to the bit, is independent of the rows it is batched with (across
    chunks too), and is within the weights' one digit of the float64 product."""
    from sketchstream.models import mlp
    from sketchstream.models.mlp import Int8Layer

    layer, w, x, scale, out = _layer_checked(Int8Layer, seed=4, rows=600)
    assert len(x) > mlp.FIXED_CHUNK  # more than one chunk
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    # a weight (times its input's scale) is off by half its row's digit at most, an input by
    # 1/512 of its scale
    ws = np.abs(w.astype(np.float64)) * scale.astype(np.float64)[None, :]
    digit = ws.max(axis=1) / 127.0
    bound = (np.abs(x) / scale).sum(axis=1)[:, None] * digit / 2 + ws.sum(axis=1) / 512
    assert np.all(np.abs(out - exact) <= bound + 1e-5), np.abs(out - exact).max()
    monkeypatch.setattr(mlp, "int8_products_exact", lambda: False)  # BLAS on the digits
    again = np.empty_like(out)
    layer.product(x, again)
    np.testing.assert_array_equal(again, out)


def test_fixed_products_on_a_cpu_without_exact_int8_sums_give_the_same_bits(monkeypatch):
    """Where torch's int8 product is not exact (AVX2 without VNNI saturates), the digits go
    through BLAS as floats: the same integers, so the same scores to the bit."""
    from sketchstream.models import mlp

    assert mlp.int8_products_exact()  # this machine's (x86 with VNNI/AMX): the int8 path
    model, x = _fixed_model()
    fast = model.predict(x)
    monkeypatch.setattr(mlp, "int8_products_exact", lambda: False)
    np.testing.assert_array_equal(model.predict(x), fast)


@pytest.mark.parametrize(("products", "near"), [("fixed16", 2e-3), ("int8", 1e-2)])
@pytest.mark.parametrize("kw", [{}, {"members": 2}, {"modalities": 0}, {"blocks": 0}])
def test_fixed_point_predict_equals_its_torch_forward_and_float32_closely(
    monkeypatch, kw, products, near
):
    """A calibrated fixed16 or int8 model: the compiled ``predict`` against the torch forward
    (the products' digits may differ where LayerNorm's last bits do: within 5e-5), against
    the same weights' float32 products (within ``near``: int8 has one weight digit), and
    independent of the batch (1e-6)."""
    from sketchstream.models import kernels

    model, x = _fixed_model(products=products, **kw)
    assert model.fixed_ready
    compiled = model.predict(x)
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = model.predict(x)
    monkeypatch.setattr(kernels, "ENABLED", True)
    np.testing.assert_allclose(compiled, reference, atol=5e-5, rtol=0)
    float32 = _float32_twin(model)
    diff = np.abs(float32.predict(x) - compiled)
    assert 0 < diff.max() < near, diff.max()
    np.testing.assert_allclose(model.predict(x, batch_size=7), compiled, atol=1e-6, rtol=0)


def replace_products(cfg: MLPConfig, products: str) -> MLPConfig:
    return MLPConfig.from_dict({**cfg.to_dict(), "products": products})


def _float32_twin(model: EngagementMLP) -> EngagementMLP:
    """``model``'s weights in a ``"float32"`` model (its scales left behind)."""
    twin = EngagementMLP(replace_products(model.config, "float32"))
    twin.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "fixed_scale" not in k}, strict=True
    )
    return twin


def test_fixed16_before_calibration_predicts_in_float32_and_its_scales_are_saved():
    """Training (before ``calibrate_products``) runs float32 products; the calibrated scales
    are buffers saved with the weights, so a reloaded model predicts the same."""
    model, x = _fixed_model()
    fresh = EngagementMLP(model.config)
    assert not fresh.fixed_ready
    fresh.load_state_dict(
        {k: (v * 0 if "fixed_scale" in k else v) for k, v in model.state_dict().items()}
    )
    float32 = _float32_twin(model)
    np.testing.assert_array_equal(fresh.predict(x), float32.predict(x))
    fresh.load_state_dict(model.state_dict())
    assert fresh.fixed_ready
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    scale = model.fixed_scale_1.numpy()  # the first block's: LeakyReLU(LayerNorm) outputs
    assert np.all(scale > 0)
    with pytest.raises(ModelError, match="products"):
        EngagementMLP(replace_products(model.config, "float32")).calibrate_products(x)
    with pytest.raises(ModelError, match="products"):
        _config(products="int4")


def test_set_threads_pins_torch_and_blas():
    from sketchstream.models.mlp import set_threads
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpool_info() if p["user_api"] == "blas")
    finally:
        set_threads(before)


_MLP_WARM_UP_THEN_A_BATCH = """
import json
import sys
import numpy as np
from sketchstream.models import mlp_kernels
from sketchstream.models.boost import BoostedHead, HeadBoost, Trees
from sketchstream.models.mlp import EngagementMLP, MLPConfig, MLPInputs

names = [n for n in mlp_kernels.__all__ if hasattr(getattr(mlp_kernels, n), "signatures")]
products = sys.argv[1]
names.remove("dequantize8" if products == "fixed16" else "dequantize16")  # the other's
cfg = MLPConfig(n_dense=5, modalities=2, depth=3, width=8, hidden=16, quantiles=8, bins=4,
                binned=(1, 2), products=products)
model = EngagementMLP(cfg)
rng = np.random.default_rng(0)
model.set_normalization(rng.normal(size=(50, 5)))
model.calibrate_products(
    MLPInputs(rng.normal(size=(50, 5)).astype(np.float32), np.zeros((50, 2, 3), np.int16))
)
# its head blended with a tree (one split), so that warm_up compiles the trees' kernel too
tree = Trees(*(np.array(a, t) for a, t in (([1], "i4"), ([0.0], "f8"), ([-1], "i4"),
             ([-2], "i4"), ([0.5, -0.5], "f8"), ([0], "i4"))))
model.boost = HeadBoost([BoostedHead("like", 0, 0.5, tree, 1)], 5)
# a fresh process: only warm_up may compile (calibration ran float32 products and the
# kernels around them, so count from here)
model.warm_up()
warm = {n: len(getattr(mlp_kernels, n).signatures) for n in names}
codes = rng.integers(-1, 8, size=(40, 2, 3)).astype(np.int16)  # as the aggregator's item codes
model.predict(MLPInputs(rng.normal(size=(40, 5)).astype(np.float32), codes))
print(json.dumps([warm, {n: len(getattr(mlp_kernels, n).signatures) for n in names}]))
"""


@pytest.mark.parametrize("products", ["fixed16", "int8"])
def test_warm_up_compiles_every_kernel_predict_calls(products):
    """In a fresh process: after ``warm_up`` each MLP kernel has its one signature and a
    batch's ``predict`` adds none (a worker compiles when a model loads, not in a batch)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MLP_WARM_UP_THEN_A_BATCH, products],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    warm, after = json.loads(out.stdout)
    assert len(warm) == 6 and all(n == 1 for n in warm.values()), warm
    assert after == warm
