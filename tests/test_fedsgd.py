"""Server-side FedSGD: averaging in partition order, clipping, optimizer, seeded sampling."""
import math

import pytest
import torch

from strategies.fedsgd import EncoderAggregator
from strategies.sampling import sample_fixed, sample_poisson, sample_round

SGD = dict(optimizer="sgd", lr=0.5, weight_decay=0.0, momentum=0.0, grad_clip=0.0, normalize_task_gradients=False)


def make(**kwargs):
    state = {"w": torch.zeros(3), "b": torch.ones(2), "running": torch.tensor([7.0])}
    return EncoderAggregator(state, ["w", "b"], **{"seed": 0, **SGD, **kwargs})


def grads(*rows):
    return [{"w": torch.tensor(r[:3]), "b": torch.tensor(r[3:])} for r in rows]


def test_sgd_step_applies_the_mean_gradient():
    agg = make()
    agg.step(grads([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, -1.0]), server_round=1)
    state = agg.state()
    assert torch.allclose(state["w"], -0.5 * torch.tensor([2.0, 2.0, 2.0]))
    assert torch.allclose(state["b"], 1 - 0.5 * torch.tensor([2.0, 2.0]))
    assert torch.equal(state["running"], torch.tensor([7.0]))  # untrained tensors are released unchanged


def test_stacked_and_listed_gradients_agree():
    rows = grads([1.0, 2.0, 3.0, 4.0, 5.0], [3.0, 2.0, 1.0, 0.0, -1.0])
    a, b = make(), make()
    a.step(rows, 1)
    b.step({k: torch.stack([r[k] for r in rows]) for k in ("w", "b")}, 1)
    assert all(torch.equal(a.state()[k], b.state()[k]) for k in ("w", "b"))


def test_aggregate_is_clipped_to_grad_clip():
    agg = make(grad_clip=1.0, lr=1.0)
    metrics = agg.step(grads([30.0, 0.0, 40.0, 0.0, 0.0]), 1)
    assert abs(metrics["aggregate_norm"] - 50.0) < 1e-4
    assert abs(float(agg.state()["w"].norm()) - 1.0) < 1e-5


def test_normalized_task_gradients_weigh_tasks_equally():
    agg = make(normalize_task_gradients=True, lr=1.0)
    agg.step(grads([100.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]), 1)
    assert torch.allclose(agg.state()["w"], torch.tensor([-0.5, -0.5, 0.0]))


def test_dp_step_clips_each_task_and_divides_by_expected_count():
    state = {"w": torch.zeros(2)}
    agg = EncoderAggregator(state, ["w"], seed=0, **{**SGD, "lr": 1.0}, dp_enabled=True, clipping_norm=1.0,
                            noise_multiplier=0.0, expected_tasks=4)
    metrics = agg.step([{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.1, 0.0])}], 1)
    # clipped rows (0.6, 0.8) + (0.1, 0) summed, divided by the expected 4 tasks, not the 2 that came
    assert torch.allclose(agg.state()["w"], -torch.tensor([0.7, 0.8]) / 4)
    assert metrics["clipped_fraction"] == 0.5


def test_sampling_depends_on_seed_and_round_only():
    assert sample_fixed(64, 8, 0, 5) == sample_fixed(64, 8, 0, 5)
    assert sample_fixed(64, 8, 0, 5) != sample_fixed(64, 8, 0, 6)
    assert len(set(sample_fixed(64, 8, 0, 5))) == 8
    counts = [len(sample_poisson(100, 0.25, 0, r)) for r in range(200)]
    assert 22 < sum(counts) / len(counts) < 28
    assert sample_round(64, 8, 0, 3, warm_start=True, dp_enabled=True) == sample_fixed(64, 8, 0, 3)
    assert sample_round(64, 8, 0, 3, warm_start=False, dp_enabled=True) == sample_poisson(64, 8 / 64, 0, 3)


def test_dp_noise_is_seeded_per_round_and_needs_task_updates():
    rows = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.1, 0.0])}]

    def run(seed):
        agg = EncoderAggregator({"w": torch.zeros(2)}, ["w"], seed=seed, **SGD, dp_enabled=True, clipping_norm=1.0,
                                noise_multiplier=1.0, expected_tasks=2)
        assert agg.needs_task_updates
        with pytest.raises(ValueError, match="^mean_grads .*use step"):
            agg.step_mean({"w": torch.zeros(2)})
        agg.step(rows, 1)
        agg.step(rows, 2)
        return agg.state()["w"]

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))
    assert not make().needs_task_updates and make(normalize_task_gradients=True).needs_task_updates


def test_adamw_is_the_default_optimizer():
    agg = EncoderAggregator({"w": torch.zeros(2)}, ["w"], seed=0, lr=0.1, weight_decay=0.01)
    assert isinstance(agg.optimizer, torch.optim.AdamW)
    assert agg.optimizer.defaults["lr"] == 0.1 and agg.optimizer.defaults["weight_decay"] == 0.01
    sgd = make(momentum=0.9, weight_decay=0.001)
    assert isinstance(sgd.optimizer, torch.optim.SGD)
    assert sgd.optimizer.defaults["momentum"] == 0.9 and sgd.optimizer.defaults["weight_decay"] == 0.001


def test_configuration_is_keyword_only():
    with pytest.raises(TypeError):
        EncoderAggregator({"w": torch.zeros(2)}, ["w"], 0, "sgd", 0.5)  # positional: the point of the test


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(optimizer="adam"), r"^optimizer must be 'sgd' or 'adamw'; got 'adam'$"),
        (dict(lr=math.inf), r"^lr must be a finite number > 0; got inf$"),
        (dict(lr=math.nan), r"^lr must be a finite number > 0; got nan$"),
        (dict(lr=0.0), r"^lr must be a finite number > 0; got 0\.0$"),
        (dict(lr="0.1"), r"^lr must be a finite number > 0; got '0\.1'$"),
        (dict(weight_decay=-1e-4), r"^weight_decay must be a finite number >= 0; got -0\.0001$"),
        (dict(momentum=math.inf), r"^momentum must be a finite number >= 0; got inf$"),
        (dict(grad_clip=-1.0), r"^grad_clip must be a finite number >= 0; got -1\.0$"),
        (dict(grad_clip=math.nan), r"^grad_clip must be a finite number >= 0; got nan$"),
        (dict(normalize_task_gradients=1), r"^normalize_task_gradients must be True or False; got 1$"),
        (dict(dp_enabled="yes"), r"^dp_enabled must be True or False; got 'yes'$"),
        (dict(clipping_norm=0.0), r"^clipping_norm must be a finite number > 0; got 0\.0$"),
        (dict(clipping_norm=math.inf), r"^clipping_norm must be a finite number > 0; got inf$"),
        (dict(noise_multiplier=-1.0), r"^noise_multiplier must be a finite number >= 0; got -1\.0$"),
        (dict(noise_multiplier=math.inf), r"^noise_multiplier must be a finite number >= 0; got inf$"),
        (dict(dp_enabled=True), r"^expected_tasks must be > 0 when dp_enabled; got None$"),
        (dict(dp_enabled=True, expected_tasks=0), r"^expected_tasks must be > 0 when dp_enabled; got 0$"),
        (dict(dp_enabled=True, expected_tasks=math.inf), r"^expected_tasks must be > 0 when dp_enabled; got inf$"),
        (dict(expected_tasks=-2.0), r"^expected_tasks must be a finite number > 0; got -2\.0$"),
        (dict(seed=-1), r"^seed must be an integer >= 0; got -1$"),
        (dict(seed=1.5), r"^seed must be an integer >= 0; got 1\.5$"),
        (dict(seed=True), r"^seed must be an integer >= 0; got True$"),
    ],
)
def test_each_parameter_is_checked_once_and_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_unknown_trainable_name_is_refused():
    with pytest.raises(ValueError, match=r"^trainable .*\['nope'\]"):
        EncoderAggregator({"w": torch.zeros(2)}, ["w", "nope"], seed=0, lr=0.1)


def test_expected_tasks_is_not_needed_without_dp():
    assert make().expected_tasks is None
    assert make(expected_tasks=4).expected_tasks == 4.0


def test_flower_strategy_takes_everything_after_the_aggregator_by_keyword():
    import inspect

    from strategies.flower_strategy import FedSGDStrategy

    params = list(inspect.signature(FedSGDStrategy.__init__).parameters.values())
    assert [p.name for p in params[:2]] == ["self", "aggregator"]
    assert params[1].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [p.name for p in params[2:]] == ["node_of_partition", "run_config_json", "tasks_per_round",
                                            "warm_start_rounds", "seed", "dp_enabled", "max_failed_fraction",
                                            "on_round", "first_round"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
