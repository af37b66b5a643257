import torch

from fedtask.data.synthetic import make_synthetic_tasks


def make(seed=0, **kw):
    args = dict(num_in_tasks=6, num_out_tasks=5, train_samples=10, holdout_samples=4, dim=12, projection_dim=3)
    args.update(kw)
    return make_synthetic_tasks(seed=seed, **args)


def test_shapes_and_labels():
    ts = make()
    assert len(ts.in_tasks) == 6 and len(ts.out_tasks) == 5
    for task in ts.in_tasks + ts.out_tasks:
        assert task.train_x.shape == (10, 12) and task.holdout_x.shape == (4, 12)
        assert task.train_y.shape == (10,) and task.holdout_y.shape == (4,)
        assert set(task.train_y.unique().tolist()) <= {0, 1}
    assert ts.num_classes == 2 and ts.input_kind == "vector" and ts.input_shape == (12,)


def test_same_seed_same_tasks_other_seed_other_tasks():
    a, b, c = make(0), make(0), make(1)
    assert all(torch.equal(x.train_x, y.train_x) and torch.equal(x.holdout_y, y.holdout_y)
               for x, y in zip(a.in_tasks + a.out_tasks, b.in_tasks + b.out_tasks))
    assert not torch.equal(a.in_tasks[0].train_x, c.in_tasks[0].train_x)


def test_in_out_and_train_holdout_are_disjoint():
    ts = make()
    rows = [tuple(r.tolist()) for t in ts.in_tasks + ts.out_tasks for r in torch.cat([t.train_x, t.holdout_x])]
    assert len(rows) == len(set(rows))  # no sample shared between tasks or splits
    names = [t.name for t in ts.in_tasks] + [t.name for t in ts.out_tasks]
    assert len(set(names)) == len(names)


def test_samples_cluster_around_their_task_mean():
    ts = make(num_in_tasks=40, num_out_tasks=2, train_samples=200, holdout_samples=2, dim=8, task_std=3.0)
    means = torch.stack([t.train_x.mean(0) for t in ts.in_tasks])
    within = torch.stack([t.train_x.var(0).mean() for t in ts.in_tasks]).mean()
    between = means.var(0).mean()
    assert 0.8 < within < 1.2  # sample_std = 1
    assert between > 4  # task_std = 3: tasks differ far more than samples within a task


def test_labels_follow_the_task_specific_projection():
    # Two tasks of the same inputs but different targets label differently: each task has its own g_i.
    ts = make(num_in_tasks=30, train_samples=64)
    balance = torch.stack([t.train_y.float().mean() for t in ts.in_tasks])
    assert balance.min() < 0.5 < balance.max()
