"""The DBA math against hand-computed values (plain PyTorch, no Ray)."""

import math

import pytest
import torch
from conftest import spawn_ranks

from dba_ray.config import DBAConfig, ScheduleConfig
from dba_ray.dba import DBA, DBAOptimizer, correction, gamma_at, lr_at, schedule_lambda


def test_gamma_schedule_and_clip():
    assert gamma_at(0, 1000, 200, 1.0) == pytest.approx(0.2)
    assert gamma_at(500, 1000, 200, 1.0) == pytest.approx(0.1)
    assert gamma_at(999, 1000, 200, 1.0) == pytest.approx(0.0002)
    # T < boost: k0 = 2, so γ is clipped at γ_max for the first half.
    assert gamma_at(0, 100, 200, 1.0) == 1.0
    assert gamma_at(49, 100, 200, 1.0) == 1.0
    assert gamma_at(60, 100, 200, 1.0) == pytest.approx(0.8)
    assert gamma_at(99, 100, 200, 1.0) == pytest.approx(0.02)
    assert gamma_at(0, 100, 200, 0.5) == 0.5


def test_lr_schedules():
    cos = ScheduleConfig(lr=1.0, warmup_ratio=0.2, min_lr_ratio=0.1, shape="cosine")
    got = [lr_at(t, 10, cos) for t in range(10)]
    assert got[:3] == pytest.approx([0.5, 1.0, 1.0])
    # p = (t - 2) / 7 after warm-up; t = 9 is the floor.
    assert got[9] == pytest.approx(0.1)
    assert got[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    lin = cos.model_copy(update={"shape": "linear"})
    assert [lr_at(t, 10, lin) for t in (2, 9)] == pytest.approx([1.0, 0.1])
    assert lr_at(5, 10, lin) == pytest.approx(1.0 - 0.9 * 3 / 7)
    # wsd: warm up, stay at the peak, then every step of the decay window goes down,
    # the last one to the floor (no step of the window stays at the peak).
    wsd = cos.model_copy(update={"shape": "wsd", "decay_ratio": 0.2})
    assert [lr_at(t, 10, wsd) for t in (1, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.55, 0.1])
    wsd = cos.model_copy(update={"shape": "wsd", "decay_ratio": 0.4, "warmup_ratio": 0.0})
    assert [lr_at(t, 10, wsd) for t in range(5, 10)] == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1])
    one = wsd.model_copy(update={"decay_ratio": 0.1})  # a one-step window still decays
    assert [lr_at(t, 10, one) for t in (8, 9)] == pytest.approx([1.0, 0.1])
    flat = cos.model_copy(update={"anneal": False})
    assert {lr_at(t, 10, flat) for t in range(10)} == {1.0}
    lam = schedule_lambda(10, cos)
    assert lam(0) == pytest.approx(0.5) and lam(50) == pytest.approx(0.1)


def toy(g_d, g_hat, cfg: DBAConfig, total=100, **kw):
    """One parameter vector with .grad = g_D, and a DBA over it."""
    p = torch.nn.Parameter(torch.zeros(len(g_d)))
    p.grad = torch.tensor(g_d, dtype=torch.float32)
    dba = DBA([("w", p)], {"w": torch.tensor(g_hat, dtype=torch.float32)}, total, cfg, **kw)
    return p, dba


def test_boosted_gradient_and_norm_correction():
    # T = 400, t = 0: γ = min(1, 200/400) = 0.5.
    p, dba = toy([1.0, 0.0], [0.0, 1.0], DBAConfig(dc="norm", c_max=2.0), total=400)
    s = dba.apply(0)
    assert s.gamma == pytest.approx(0.5)
    assert p.grad.tolist() == pytest.approx([0.5, 0.5])
    assert s.cos == pytest.approx(0.0)
    assert s.norm_d == pytest.approx(1.0) and s.norm_b == pytest.approx(math.sqrt(0.5))
    assert s.c == pytest.approx((0.5 * 1 + 0.5 * 1) / math.sqrt(0.5))


def test_correction_modes():
    # γ = 0.5, ‖ĝ‖ = 1, ‖g_D‖ = 1, orthogonal: ‖g_B‖ = √0.5.
    args = dict(gamma=0.5, norm_g=1.0, norm_d=1.0, norm_b=math.sqrt(0.5), cos=0.0, kappa=1.0)
    assert correction("norm", **args, c_max=2.0) == pytest.approx(math.sqrt(2))
    assert correction("norm", **args, c_max=1.2) == pytest.approx(1.2)
    assert correction("cosine", **args, c_max=2.0) == pytest.approx(1.5)
    assert correction("cosine", **{**args, "cos": -1.0, "kappa": 0.5}, c_max=5) == pytest.approx(1.5)
    assert correction("cosine", **{**args, "cos": 1.0}, c_max=2.0) == 1.0
    assert correction("cosine", **{**args, "cos": -1.0, "kappa": 4.0}, c_max=2.0) == 2.0  # c_max clips
    assert correction("cosine", **{**args, "cos": None}, c_max=2.0) == 1.0  # undefined cos
    assert correction("pcgrad", **args, c_max=2.0) == 1.0
    assert correction("none", **args, c_max=2.0) == 1.0
    # Aligned gradients need no correction.
    assert correction("norm", 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0) == 1.0


def test_pcgrad_projection():
    cfg = DBAConfig(ggb=False, dc="pcgrad")
    p, dba = toy([1.0, -1.0], [0.0, 2.0], cfg)
    s = dba.apply(0)
    assert s.projected and s.cos == pytest.approx(-1 / math.sqrt(2))
    assert p.grad.tolist() == pytest.approx([1.0, 0.0])
    assert s.norm_d == pytest.approx(1.0) and s.c == 1.0
    # No conflict, no projection.
    p, dba = toy([1.0, 1.0], [0.0, 2.0], cfg)
    assert not dba.apply(0).projected and p.grad.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dc", ["norm", "cosine", "pcgrad", "none"])
def test_zero_gradients_are_safe(dc):
    cfg = DBAConfig(dc=dc)
    # cos is undefined when either gradient is zero: no correction (cosine mode would
    # otherwise read it as 0 and give, e.g., an all-masked batch a larger step).
    p, dba = toy([3.0, 4.0], [0.0, 0.0], cfg, total=400)  # ĝ_G = 0
    s = dba.apply(0)
    assert p.grad.tolist() == pytest.approx([1.5, 2.0]) and s.cos == 0.0 and s.c == 1.0
    p, dba = toy([0.0, 0.0], [3.0, 4.0], cfg, total=400)  # g_D = 0
    s = dba.apply(0)
    assert p.grad.tolist() == pytest.approx([1.5, 2.0]) and s.norm_b == pytest.approx(2.5)
    assert s.c == 1.0
    p, dba = toy([0.0, 0.0], [0.0, 0.0], cfg, total=400)
    s = dba.apply(0)
    assert p.grad.tolist() == [0.0, 0.0] and all(math.isfinite(v) for v in s.as_dict().values())


def test_everything_off_leaves_the_gradient_alone():
    p, dba = toy([0.3, -0.7], [5.0, 5.0], DBAConfig(ggb=False, dc="none"))
    s = dba.apply(0)
    assert p.grad.tolist() == pytest.approx([0.3, -0.7]) and s.gamma == 0 and s.c == 1


def test_fisher_anchor():
    cfg = DBAConfig(ggb=False, dc="none", anchor="fisher", fisher_lambda=0.1)
    p, dba = toy([0.0, 0.0], [1.0, 1.0], cfg, second_moment={"w": torch.tensor([1.0, 3.0])})
    with torch.no_grad():
        p.add_(torch.tensor([2.0, -1.0]))  # θ − θ0
    dba.apply(0)
    # v / mean(v) = [0.5, 1.5]
    assert p.grad.tolist() == pytest.approx([0.1 * 0.5 * 2.0, 0.1 * 1.5 * -1.0])
    with pytest.raises(ValueError, match="second moment"):
        toy([0.0], [1.0], cfg)


def test_optimizer_wrapper_scales_lr_for_the_step_only():
    p, dba = toy([1.0, 0.0], [0.0, 1.0], DBAConfig(dc="norm"), total=400)
    opt = DBAOptimizer(torch.optim.SGD([p], lr=0.1), dba)
    opt.step()
    c = math.sqrt(2)
    assert p.detach().tolist() == pytest.approx([-0.1 * c * 0.5, -0.1 * c * 0.5])
    assert opt.param_groups[0]["lr"] == 0.1 and opt.t == 1
    assert opt.last_stats.c == pytest.approx(c)
    state = opt.state_dict()
    fresh = DBAOptimizer(torch.optim.SGD([p], lr=0.1), dba)
    fresh.load_state_dict(state)
    assert fresh.t == 1


def test_norms_and_cosine_span_every_parameter():
    """ĝ_G and g_D spread over several tensors (and one unused parameter)."""
    a, b, unused = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # ‖g_D‖ = 5
    ghat = {"a": torch.tensor([0.0, 6.0]), "b": torch.tensor([0.0, 8.0]), "unused": torch.zeros(2)}
    dba = DBA([("a", a), ("b", b), ("unused", unused)], ghat, 400, DBAConfig(dc="norm"))
    assert dba.norm_g == pytest.approx(10.0)
    s = dba.apply(0)  # γ = 0.5
    # ⟨g_D, ĝ⟩ = 4·8 = 32, cos = 32 / 50
    assert s.cos == pytest.approx(0.64) and s.norm_d == pytest.approx(5.0)
    g_b = torch.cat([a.grad, b.grad])
    assert g_b.tolist() == pytest.approx([1.5, 3.0, 0.0, 6.0])
    assert s.norm_b == pytest.approx(float(g_b.norm()))
    assert s.c == pytest.approx(min(2.0, (0.5 * 10 + 0.5 * 5) / float(g_b.norm())))
    assert unused.grad.tolist() == [0.0, 0.0]


def test_saturation_warning_counts_the_steps_at_gamma_max():
    from dba_ray.trainer import saturation_warning

    paper = DBAConfig()  # boost 200, γ_max 1
    assert "for 8 of 8 steps" in saturation_warning("dba", paper, 8)
    # γ_t = 200/T·(1 − t/T) ≥ 1 while t ≤ T − T²/200: the first 38 of 150 steps (more
    # than a tenth: said), the first 10 of 190 (not more), none of 400.
    assert "for 38 of 150 steps" in saturation_warning("dba", paper, 150)
    assert saturation_warning("dba", paper, 190) is None
    assert saturation_warning("dba", paper, 400) is None
    assert saturation_warning("dba", DBAConfig(ggb=False), 8) is None


@pytest.mark.parametrize(
    "mode, expected",
    [
        # g_B = ½ĝ_G + ½g_D; AdamW's first step is −lr·sign: the untouched weight moves a full lr.
        ("gradient", ([-0.1, -0.1], [0.1])),
        # ĝ_G clipped to ±|g_D|: nothing for the untouched weight, and w2's boost cancels g_D.
        ("masked", ([-0.1, 0.0], [0.0])),
        # AdamW on g_D, then −γ·lr·ĝ_G/√v_G: −0.05·[0.1/0.2, 0.3/0.5] and −0.05·(−0.4/0.5).
        ("update", ([-0.125, -0.03], [-0.06])),
    ],
)
def test_boost_modes_against_a_hand_computed_step(mode, expected):
    w1, w2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    grad = {"w1": torch.tensor([0.1, 0.3]), "w2": torch.tensor([-0.4])}
    v_g = {"w1": torch.tensor([0.04, 0.25]), "w2": torch.tensor([0.25])}
    cfg = DBAConfig(boost=5, gamma_max=1.0, dc="none", boost_mode=mode)  # T = 10: γ_0 = 0.5
    dba = DBA([("w1", w1), ("w2", w2)], grad, 10, cfg, second_moment=v_g)
    opt = DBAOptimizer(torch.optim.AdamW([w1, w2], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0), dba)
    w1.grad, w2.grad = torch.tensor([0.5, 0.0]), torch.tensor([0.2])  # w1[1]: no domain gradient
    opt.step()
    assert dba.gamma == 0.5
    torch.testing.assert_close(w1.detach(), torch.tensor(expected[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(w2.detach(), torch.tensor(expected[1]), rtol=0, atol=1e-6)
    # Negative control: plain AdamW on g_D lands elsewhere in every mode.
    plain = torch.nn.Parameter(torch.zeros(3))
    control = torch.optim.AdamW([plain], lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    plain.grad = torch.tensor([0.5, 0.0, 0.2])
    control.step()
    assert not torch.allclose(torch.cat([w1, w2]).detach(), plain.detach(), atol=1e-3)


def _sharded_worker(rank: int, world: int, port: int, mode: str, out: dict) -> None:
    """One rank of a 2-process gloo group holding rows rank::world of every tensor, as
    FSDP's shards do; DBA sums its statistics across ranks."""
    import torch.distributed as dist

    from dba_ray.sharding import all_reduce_sum

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    full = _toy_tensors()
    rows = {n: slice(rank * t.shape[0] // world, (rank + 1) * t.shape[0] // world) for n, t in full["theta"].items()}
    params = {n: torch.nn.Parameter(t[rows[n]].clone()) for n, t in full["theta"].items()}
    shard = {k: {n: t[rows[n]] for n, t in full[k].items()} for k in ("grad", "v", "g_d")}
    out[rank] = {n: p.detach() for n, p in _run_toy(params, shard, mode, all_reduce_sum).items()}
    dist.destroy_process_group()


def _toy_tensors() -> dict:
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 3), "b": (6,)}
    t = {k: {n: torch.randn(s, generator=gen) for n, s in shapes.items()} for k in ("theta", "grad", "g_d")}
    t["v"] = {n: g.pow(2) + torch.rand(g.shape, generator=gen) for n, g in t["grad"].items()}
    t["g_d"]["a"][1] = 0.0  # a row the domain gradient never touches
    return t


def _run_toy(params: dict, t: dict, mode: str, all_reduce=None) -> dict:
    cfg = DBAConfig(boost=3, dc="norm", boost_mode=mode, anchor="fisher", fisher_lambda=0.5)  # γ_t < 1
    dba = DBA(list(params.items()), t["grad"], 4, cfg, second_moment=t["v"], all_reduce=all_reduce)
    opt = DBAOptimizer(torch.optim.AdamW(params.values(), lr=0.05), dba)
    for step in range(3):
        for n, p in params.items():
            p.grad = t["g_d"][n] * (step + 1) + 0.1 * p.detach()
        opt.step()
    return params


@pytest.mark.parametrize("mode", ["gradient", "masked", "update"])
def test_boost_modes_on_sharded_ranks_match_one_process(mode):
    import socket

    import torch.multiprocessing as mp

    full = _toy_tensors()
    one = _run_toy({n: torch.nn.Parameter(t.clone()) for n, t in full["theta"].items()}, full, mode)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    spawn_ranks(_sharded_worker, (2, port, mode, out), 2)
    for n, p in one.items():
        torch.testing.assert_close(torch.cat([out[0][n], out[1][n]]), p.detach(), rtol=1e-6, atol=1e-7)
