"""Concept-learning losses on small problems with known answers: exact OT by linear programming, a loop-based
supervised contrastive loss, hand-computed masked MSE and the DDPM v-prediction formula."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.optimize import linprog

from benchmark_scripts import load_benchmark
from diffusers_conceptexpress.losses import (
    diffusion_target,
    grid_cost,
    masked_diffusion_loss,
    sinkhorn_distance,
    supcon_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the CPU is shared, and a second OpenMP thread that waits for a busy core makes
    the many small Sinkhorn kernels 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------- grid_cost


def test_grid_cost_2x3_by_hand():
    # cells in raster order:  0 1 2
    #                         3 4 5
    c = grid_cost(2, 3)
    assert c.shape == (6, 6) and c.dtype == torch.float32
    assert torch.equal(c, c.T)
    assert torch.equal(c.diagonal(), torch.zeros(6))
    expected = {
        (0, 1): 1.0,
        (0, 2): 2.0,
        (0, 3): 1.0,
        (0, 4): math.sqrt(2.0),
        (0, 5): math.sqrt(5.0),
        (1, 3): math.sqrt(2.0),
        (2, 3): math.sqrt(5.0),
        (1, 4): 1.0,
        (3, 5): 2.0,
    }
    for (i, j), value in expected.items():
        assert c[i, j].item() == pytest.approx(value, abs=1e-6), (i, j)


def test_grid_cost_dtype_device_and_non_square():
    c = grid_cost(3, 2, dtype=torch.float64, device="cpu")
    assert c.dtype == torch.float64 and c.shape == (6, 6)
    # 3 rows x 2 columns: cell 0 is (0, 0), cell 5 is (2, 1)
    assert c[0, 5].item() == pytest.approx(math.sqrt(4.0 + 1.0))
    assert c[1, 4].item() == pytest.approx(math.sqrt(4.0 + 1.0))
    with pytest.raises(ValueError):
        grid_cost(0, 3)


# --------------------------------------------------------------------------------------------- Sinkhorn


def exact_ot(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> float:
    """min <P, C> over P >= 0 with P 1 = a, P^T 1 = b, by linear programming."""
    n = a.size
    rows = np.kron(np.eye(n), np.ones((1, n)))  # sum_j P_ij = a_i
    cols = np.kron(np.ones((1, n)), np.eye(n))  # sum_i P_ij = b_j
    res = linprog(
        cost.ravel(),
        A_eq=np.vstack([rows, cols]),
        b_eq=np.concatenate([a, b]),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0, res.message
    return float(res.fun)


def _problem(kind: str, rng: np.random.Generator) -> torch.Tensor:
    if kind == "grid2x3":
        return grid_cost(2, 3, dtype=torch.float64)
    if kind == "grid3x3":
        return grid_cost(3, 3, dtype=torch.float64)
    points = torch.from_numpy(rng.random((8, 2)) * 3.0)  # random points, costs of order 1
    return torch.cdist(points, points)


@pytest.mark.parametrize(("kind", "seed"), [("grid2x3", 0), ("grid3x3", 1), ("points", 2)])
def test_sinkhorn_matches_exact_ot(kind, seed):
    rng = np.random.default_rng(seed)
    cost = _problem(kind, rng)
    n = cost.shape[0]
    a, b = rng.random(n), rng.random(n)
    a, b = a / a.sum(), b / b.sum()
    exact = exact_ot(a, b, cost.numpy())
    assert exact > 0.05  # a non-trivial problem
    value = sinkhorn_distance(torch.from_numpy(a), torch.from_numpy(b), cost, reg=1e-2, num_iters=10000)
    assert value.shape == ()
    assert value.item() == pytest.approx(exact, rel=1e-2)


def test_sinkhorn_normalises_inputs():
    rng = np.random.default_rng(3)
    cost = grid_cost(3, 3, dtype=torch.float64)
    a, b = rng.random(9), rng.random(9)
    exact = exact_ot(a / a.sum(), b / b.sum(), cost.numpy())
    value = sinkhorn_distance(
        torch.from_numpy(5.0 * a), torch.from_numpy(0.1 * b), cost, reg=1e-2, num_iters=10000
    )
    assert value.item() == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize(("reg", "num_iters"), [(1e-2, 2000), (1e-3, 200)])
def test_sinkhorn_identical_histograms_cost_nothing(reg, num_iters):
    a = torch.rand(9, generator=torch.Generator().manual_seed(0))
    value = sinkhorn_distance(a, a.clone(), grid_cost(3, 3), reg=reg, num_iters=num_iters)
    assert value.item() == pytest.approx(0.0, abs=1e-5)


def test_sinkhorn_point_mass_moved_one_cell_costs_one():
    a = torch.zeros(9, dtype=torch.float64)
    b = torch.zeros(9, dtype=torch.float64)
    a[4] = 1.0  # centre of a 3x3 grid
    b[5] = 1.0  # one cell to the right
    value = sinkhorn_distance(a, b, grid_cost(3, 3, dtype=torch.float64), reg=1e-2, num_iters=2000)
    assert value.item() == pytest.approx(1.0, abs=1e-3)
    b2 = torch.zeros(9, dtype=torch.float64)
    b2[8] = 1.0  # one cell diagonally
    value = sinkhorn_distance(a, b2, grid_cost(3, 3, dtype=torch.float64), reg=1e-2, num_iters=2000)
    assert value.item() == pytest.approx(math.sqrt(2.0), abs=1e-3)


def test_sinkhorn_batches_and_broadcasts():
    g = torch.Generator().manual_seed(1)
    cost = grid_cost(2, 3, dtype=torch.float64)
    a = torch.rand(2, 3, 6, generator=g, dtype=torch.float64)
    b = torch.rand(3, 6, generator=g, dtype=torch.float64)
    batched = sinkhorn_distance(a, b, cost, reg=1e-2, num_iters=500)
    assert batched.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            single = sinkhorn_distance(a[i, j], b[j], cost, reg=1e-2, num_iters=500)
            torch.testing.assert_close(batched[i, j], single)


def test_sinkhorn_authors_defaults_are_finite_and_differentiable():
    g = torch.Generator().manual_seed(0)
    cost = grid_cost(16, 16)
    a = torch.rand(3, 256, generator=g).requires_grad_(True)
    b = torch.rand(3, 256, generator=g)
    value = sinkhorn_distance(a, b, cost)  # reg 1e-3, 200 iterations, float32
    assert value.shape == (3,)
    assert torch.isfinite(value).all()
    assert (value >= 0).all()
    value.sum().backward()
    assert a.grad is not None
    assert torch.isfinite(a.grad).all()
    assert a.grad.abs().sum() > 0


def test_sinkhorn_rejects_bad_shapes():
    with pytest.raises(ValueError):
        sinkhorn_distance(torch.rand(6), torch.rand(9), grid_cost(2, 3))
    with pytest.raises(ValueError):
        sinkhorn_distance(torch.rand(6), torch.rand(6), grid_cost(2, 3), reg=0.0)


# --------------------------------------------------------------------------------------------- SupCon


def supcon_by_loops(features: torch.Tensor, labels: list[int], temperature: float) -> float:
    """The L_out supervised contrastive loss, written out with Python loops and math."""
    rows = features.double().tolist()
    normed = []
    for row in rows:
        norm = math.sqrt(sum(v * v for v in row))
        normed.append([v / norm for v in row])

    def sim(i: int, j: int) -> float:
        return sum(x * y for x, y in zip(normed[i], normed[j], strict=True))

    n = len(rows)
    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(sim(i, a) / temperature) for a in range(n) if a != i)
        total = 0.0
        for p in positives:
            total += math.log(math.exp(sim(i, p) / temperature) / denominator)
        per_anchor.append(-total / len(positives))
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_loops(temperature):
    g = torch.Generator().manual_seed(0)
    labels = [0, 1, 2] * 4
    labels = [labels[i] for i in torch.randperm(12, generator=g).tolist()]
    features = torch.randn(12, 16, generator=g, dtype=torch.float64) * 3.0
    expected = supcon_by_loops(features, labels, temperature)
    got = supcon_loss(features, torch.tensor(labels), temperature)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-10)
    got32 = supcon_loss(features.float(), torch.tensor(labels), temperature)
    assert got32.item() == pytest.approx(expected, rel=1e-5)


def test_supcon_skips_anchors_without_positives():
    g = torch.Generator().manual_seed(1)
    labels = [0, 0, 1, 1, 1, 2, 3]  # labels 2 and 3 have no positives, but stay in the denominators
    features = torch.randn(7, 8, generator=g, dtype=torch.float64)
    expected = supcon_by_loops(features, labels, 0.1)
    assert supcon_loss(features, torch.tensor(labels), 0.1).item() == pytest.approx(expected, rel=1e-10)
    # no anchor with a positive: zero, still differentiable
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    loss = supcon_loss(x, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert x.grad is not None


def test_supcon_lower_for_clustered_features():
    labels = torch.tensor([0, 1, 2] * 4)
    clustered = torch.eye(8)[labels] * 2.5  # same label: identical vectors; different labels: orthogonal
    g = torch.Generator().manual_seed(0)
    for temperature in (0.07, 0.5):
        clustered_loss = supcon_loss(clustered, labels, temperature)
        # with s = 1 for the 3 positives and s = 0 for the 8 negatives: log(3 + 8 exp(-1/T))
        assert clustered_loss.item() == pytest.approx(math.log(3 + 8 * math.exp(-1 / temperature)), rel=1e-5)
        for _ in range(3):
            random_loss = supcon_loss(torch.randn(12, 8, generator=g), labels, temperature)
            assert clustered_loss < random_loss


def test_supcon_gradient_is_finite_at_small_temperature():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 32, generator=g, requires_grad=True)
    supcon_loss(x, torch.tensor([0, 1, 2] * 4), temperature=0.01).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- masked loss


def test_masked_diffusion_loss_known_value():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, -2.0]]]])  # (1, 2, 2, 2)
    target = torch.zeros_like(prediction)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    # masked squared errors: channel 0: 1 + 16, channel 1: 0 + 4; mean over all 8 elements
    loss = masked_diffusion_loss(prediction, target, mask)
    assert loss.item() == pytest.approx(21.0 / 8.0)


def test_masked_diffusion_loss_mask_shapes_agree():
    g = torch.Generator().manual_seed(0)
    prediction = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.rand(2, 8, 8, generator=g) > 0.5
    a = masked_diffusion_loss(prediction, target, mask)
    b = masked_diffusion_loss(prediction, target, mask[:, None].float())
    assert a.item() == b.item()
    manual = ((prediction - target) ** 2 * mask[:, None]).sum() / prediction.numel()
    assert a.item() == pytest.approx(manual.item(), rel=1e-6)
    with pytest.raises(ValueError):
        masked_diffusion_loss(prediction, target, mask[:, :4])


def test_masked_diffusion_loss_gradient_only_inside_mask():
    g = torch.Generator().manual_seed(1)
    prediction = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.rand(2, 1, 8, 8, generator=g) > 0.5
    masked_diffusion_loss(prediction, target, mask).backward()
    inside = mask.expand_as(prediction)
    assert torch.equal(prediction.grad[~inside], torch.zeros(int((~inside).sum())))
    assert (prediction.grad[inside] != 0).all()


# --------------------------------------------------------------------------------------------- targets


def _latents_noise_timesteps():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    return latents, noise, torch.tensor([0, 500, 999])


def test_diffusion_target_v_prediction():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise, timesteps = _latents_noise_timesteps()
    target = diffusion_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    alpha_bar = scheduler.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
    formula = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(target, formula)
    assert not torch.allclose(target, noise)


def test_diffusion_target_epsilon_and_sample():
    latents, noise, timesteps = _latents_noise_timesteps()
    assert torch.equal(diffusion_target(DDPMScheduler(), latents, noise, timesteps), noise)
    sample = DDPMScheduler(prediction_type="sample")
    assert torch.equal(diffusion_target(sample, latents, noise, timesteps), latents)


def test_diffusion_target_unknown_type():
    latents, noise, timesteps = _latents_noise_timesteps()
    scheduler = SimpleNamespace(config=SimpleNamespace(prediction_type="flow_matching"))
    with pytest.raises(ValueError, match="flow_matching"):
        diffusion_target(scheduler, latents, noise, timesteps)


def test_dual_gradient_matches_finite_difference_of_exact_ot():
    # At convergence the dual potential is the derivative of OT along mass-preserving perturbations.
    rng = np.random.default_rng(7)
    cost = grid_cost(3, 3, dtype=torch.float64)
    a, b = rng.random(9) + 0.2, rng.random(9) + 0.2
    a, b = a / a.sum(), b / b.sum()
    at = torch.from_numpy(a).requires_grad_(True)
    sinkhorn_distance(at, torch.from_numpy(b), cost, reg=5e-3, num_iters=20000).backward()
    direction = rng.normal(size=9)
    direction -= direction.mean()
    eps = 1e-4
    fd = (exact_ot(a + eps * direction, b, cost.numpy()) - exact_ot(a - eps * direction, b, cost.numpy())) / (
        2 * eps
    )
    assert float(at.grad.numpy() @ direction) == pytest.approx(fd, rel=5e-2, abs=1e-3)


def test_dual_gradient_is_alive_at_the_authors_defaults_where_autograd_is_not():
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = lambda cy, cx: torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 8.0).flatten()  # noqa: E731
    target = blob(4.0, 4.0)
    for mode, alive in (("dual", True), ("autograd", False)):
        attn = blob(10.0, 11.0).clone().requires_grad_(True)
        sinkhorn_distance(target, attn, grid_cost(16, 16), gradient=mode).backward()
        assert torch.isfinite(attn.grad).all()
        assert (attn.grad.abs().max() > 1e-6) == alive


def _blob_maps(side: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary-mask targets and peaked attention-like maps, (count, side * side) each: the benchmark's inputs."""
    return load_benchmark("sinkhorn_cost").maps(
        "mask vs attention", side, count, torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize(
    ("inputs", "dtype", "gradient"),
    [
        ("blobs", torch.float32, "dual"),
        ("random", torch.float32, "dual"),
        ("blobs", torch.float64, "dual"),
        ("blobs", torch.float32, "autograd"),
        ("asymmetric", torch.float32, "dual"),
    ],
)
def test_pruned_sinkhorn_equals_dense(inputs, dtype, gradient):
    # Skipping the log-sum-exp terms that underflow to 0 must not change value or gradient (up to the
    # order of float additions), at the authors' defaults where the potentials spread over thousands.
    side = 8 if gradient == "autograd" else 16
    a, b = _blob_maps(side, 6, seed=3)
    cost = grid_cost(side, side, dtype=dtype)
    if inputs == "random":
        g = torch.Generator().manual_seed(4)
        a, b = torch.rand(6, side * side, generator=g), torch.rand(6, side * side, generator=g)
    if inputs == "asymmetric":  # a general cost: not symmetric, non-zero diagonal
        g = torch.Generator().manual_seed(5)
        cost = cost * (1 + torch.rand(cost.shape, generator=g)) + 0.5 * torch.rand(side * side, generator=g)
    results = []
    for prune in (False, True):
        x = b.to(dtype).clone().requires_grad_(True)
        value = sinkhorn_distance(a.to(dtype), x, cost, gradient=gradient, prune=prune)
        value.sum().backward()
        results.append((value.detach(), x.grad))
    (v_dense, g_dense), (v_pruned, g_pruned) = results
    assert v_dense.abs().max() > 0  # a real transport cost, not a vacuous 0 == 0
    torch.testing.assert_close(v_pruned, v_dense, rtol=1e-5, atol=1e-7)
    # autograd through 200 iterations amplifies rounding more than the dual potentials do
    rtol = 1e-4 if gradient == "autograd" else 1e-5
    torch.testing.assert_close(g_pruned, g_dense, rtol=rtol, atol=1e-6 * g_dense.abs().max().item())


def test_pruning_keeps_exactly_the_terms_that_can_be_nonzero():
    from diffusers_conceptexpress.losses import _NearestCells

    cost = grid_cost(3, 3)
    flat = torch.zeros(2, 9)
    # equal potentials, reg 1e-3: a neighbour one cell away is 1000 below the diagonal term: only the diagonal
    assert (
        _NearestCells(cost, 1e-3)
        .logsumexp(flat, "col")
        .equal(torch.logsumexp(flat[..., :, None] - cost / 1e-3, dim=-2))
    )
    nearest = _NearestCells(cost, 1.0)  # reg 1: every term is within exp's range, all 9 are kept
    h = torch.randn(2, 9)
    torch.testing.assert_close(nearest.logsumexp(h, "row"), torch.logsumexp(h[..., None, :] - cost, dim=-1))
    # a potential 1010 above its neighbours brings them back in: its term dominates theirs by e^10
    h = torch.zeros(1, 9)
    h[0, 4] = 1010.0
    dense = torch.logsumexp(h[..., :, None] - cost / 1e-3, dim=-2)
    torch.testing.assert_close(dense[0, [1, 3, 5, 7]], torch.full((4,), 10.0), rtol=0, atol=1e-3)
    torch.testing.assert_close(_NearestCells(cost, 1e-3).logsumexp(h, "col"), dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [-1, -2])
def test_fast_logsumexp_equals_torch_where_terms_underflow(dtype, dim):
    # Sinkhorn's terms at reg 1e-3 lie thousands of log units apart; most of them underflow in exp.
    from diffusers_conceptexpress.losses import _exp_flushed, _logsumexp

    g = torch.Generator().manual_seed(0)
    x = (-5000 * torch.rand(6, 64, 64, generator=g)).to(dtype)
    x[..., 3, 5] = 0.0  # a few terms near the top too
    x[..., 7, :] += 60 * torch.rand(64, generator=g).to(dtype)
    torch.testing.assert_close(
        _logsumexp(x, dim), torch.logsumexp(x, dim), rtol=2 * torch.finfo(dtype).eps, atol=0
    )
    tiny = torch.finfo(dtype).tiny
    expected = torch.exp(x)
    torch.testing.assert_close(_exp_flushed(x), torch.where(expected < tiny, 0.0, expected), rtol=0, atol=0)
    assert (_exp_flushed(x) > 0).any() and (_exp_flushed(x) == 0).any()
