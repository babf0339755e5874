"""Sharded training on 8 fake CPU devices (conftest): data, fsdp and tensor meshes give the
single-device loss and gradients, parameters and optimizer state live where the rules say, and
a checkpoint written on one mesh resumes on another with the same losses."""

import functools
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lime_jax.train import checkpoint as ckpt
from lime_jax.parallel import sharding as sharding_lib
from lime_jax.train import step as step_lib
from lime_jax.train import loop as train_lib
from lime_jax.data import tasks as tasks_lib
from lime_jax.train.evaluate import filled_to_multiple, task_metrics
from lime_jax.train.experiment import load_experiment
from lime_jax.train.metrics import read_metrics
from lime_jax.parallel.mesh_config import MeshConfig
from lime_jax.parallel.sharding import Layout

# R = H = 4 so that tensor=4 splits kv heads; V = 264 (>= the byte tokenizer's 258) divides by 8.
TINY = ["model.D=32", "model.L=2", "model.H=4", "model.F=64", "model.T=16", "model.V=264",
        "data.seq_len=16", "data.batch_size=8",
        "optim.warmup_steps=1", "optim.total_steps=8", "run.log_every=1", "run.eval_every=100",
        "run.checkpoint_every=2", "run.progress=false", "run.tensorboard=false"]
MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "d2f2t2": (2, 2, 2), "d2t4": (2, 1, 4)}
# Variants: a router name, or a model key=value (the cross-layer baselines).
VARIANTS = ["none", "hidden-static", "hidden-dynamic", "connections=denseformer",
            "connections=hyper-dynamic", "kv-static:routing_impl=pull", "connections=attn-res",
            "depth-attention", "connections=mhc", "value-residual"]
CASES = [("kv-static", m) for m in MESHES] + [(v, "d2f2t2") for v in VARIANTS]


def _layout(mesh: str) -> Layout:
  return Layout.from_config(MeshConfig(*MESHES[mesh]))


@functools.lru_cache(maxsize=None)
def _cfg(variant: str):
  router, _, extra = variant.partition(":")  # router[:key=value], or a baseline's key=value
  overrides = ["model.router=none", f"model.{router}"] if "=" in router else [
      f"model.router={router}"] + ([f"model.{extra}"] if extra else [])
  return load_experiment(None, [*TINY, *overrides])


def _batch():
  tokens = np.random.default_rng(0).integers(0, 258, (8, 17), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _value_and_grad(model_cfg):
  return jax.value_and_grad(lambda params, batch: step_lib.loss_fn(params, model_cfg, batch))


@functools.lru_cache(maxsize=None)
def _reference(router: str):
  """Single-device params, loss and gradients (the unsharded program)."""
  cfg = _cfg(router)
  params = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed)[0]()["params"]
  loss, grads = jax.jit(_value_and_grad(cfg.model))(params, _batch())
  return jax.device_get(params), float(loss), jax.device_get(grads)


@pytest.mark.parametrize("router,mesh", CASES)
def test_sharded_loss_and_gradients_equal_single_device(router, mesh):
  cfg = _cfg(router)
  params, ref_loss, ref_grads = _reference(router)
  layout = _layout(mesh)
  shardings = sharding_lib.state_shardings(jax.eval_shape(lambda: params), cfg.model, layout)
  batch_sharding = layout.batch_sharding(8)
  grad_fn = sharding_lib.OnMesh(jax.jit(
      _value_and_grad(cfg.model), in_shardings=(shardings, batch_sharding),
      out_shardings=(layout.replicated, shardings)), layout)
  loss, grads = grad_fn(jax.device_put(params, shardings),
                        sharding_lib.place_local_batch(_batch(), batch_sharding))
  assert loss.sharding.is_fully_replicated
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
  for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # The work really was split: a kv projection gradient shard holds 1/(fsdp*tensor) of it.
  kv = grads["layers"]["segment_0"]["block"]["kv_proj"]
  _, fsdp, tensor = MESHES[mesh]
  shard = kv.addressable_shards[0].data.shape
  assert shard[1] * fsdp == kv.shape[1] and shard[2] * tensor == kv.shape[2]


@pytest.mark.parametrize("rows,weighted", [(8, False), (5, False), (5, True)],
                         ids=["8-rows", "5-rows", "5-rows-weighted"])
def test_validation_splits_the_rows_and_equals_single_device(rows, weighted):
  """Validation runs under the mesh's scope, as the step: each of the 8 fsdp devices scores its
  own row (outside the scope the compiler gave every device the whole batch's logits). Rows
  that do not split over the shards are filled up at zero weight: the same loss."""
  cfg = _cfg("kv-static")
  layout = _layout("fsdp8")
  batch = {key: value[:rows] for key, value in _batch().items()}
  if weighted:  # a task batch: answer tokens only
    batch["weights"] = (np.arange(16)[None, :] >= 10).repeat(rows, 0).astype(np.float32)
  init, _, evaluate = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed, layout)
  params = init()["params"]
  expected = jax.jit(functools.partial(step_lib.eval_step, model_cfg=cfg.model))(
      _reference("kv-static")[0], batch)
  np.testing.assert_allclose(float(evaluate(params, batch)), float(expected), rtol=1e-6)
  filled = filled_to_multiple(batch, layout.batch_shards)
  assert len(filled["targets"]) == 8
  assert not filled.get("weights", np.zeros(0))[rows:].any()  # the filler rows weigh nothing
  for key, value in batch.items():
    np.testing.assert_array_equal(filled[key][:rows], value)
  compiled = train_lib.sharded_eval(cfg.model, layout).lower(
      params, sharding_lib.place_global_batch(filled, layout)).compile().as_text()
  logits_shapes = set(re.findall(r"f32\[(\d+),16,264\]", compiled))
  assert logits_shapes == {"1"}, logits_shapes


def test_task_accuracy_splits_the_rows_under_the_mesh(monkeypatch):
  """Task accuracy is traced under the run's mesh scope too (`task_metrics` given the layout):
  on fsdp=8 its exact-match program's logits hold one of a test batch's 8 rows a device; one
  device's program holds all 8. Same accuracy both ways."""
  cfg = load_experiment(None, [*TINY, "model.T=32", "task.name=mqar", "task.difficulty=2",
                               "task.seq_len=32", "task.num_test=12", "task.batch_size=8"])
  layout = _layout("fsdp8")
  params = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed, layout)[0]()["params"]
  logits_rows = []
  evaluate_task = tasks_lib.evaluate_task

  def recorded(apply, params, task_cfg):  # the program evaluate_task runs, in its context
    batch = tasks_lib.make_test_batches(task_cfg)[0]
    text = tasks_lib._jit_counts(apply).lower(params, batch).compile().as_text()
    logits_rows.append(set(re.findall(rf"f32\[(\d+),32,{cfg.model.V}\]", text)))
    return evaluate_task(apply, params, task_cfg)

  monkeypatch.setattr(tasks_lib, "evaluate_task", recorded)
  sharded = task_metrics(params, cfg.model, cfg.task, layout)
  assert sharded == task_metrics(jax.device_get(params), cfg.model, cfg.task)
  assert logits_rows == [{"1"}, {"8"}]


def test_parameters_and_optimizer_state_are_born_sharded_by_the_rules():
  cfg = _cfg("kv-static")
  init = train_lib.jitted_fns(cfg.model, cfg.optim, cfg.run.seed, _layout("d2f2t2"))[0]
  state = init()
  block = state["params"]["layers"]["segment_0"]["block"]
  expected = {  # (layers, ...) from the default rules: embed->fsdp, heads/kv_heads/mlp->tensor
      "kv_proj": P(None, "fsdp", "tensor", None, None),
      "attn/q_proj": P(None, "fsdp", "tensor", None),
      "attn/o_proj": P(None, "tensor", None, "fsdp"),
      "mlp/gate_up": P(None, "fsdp", None, "tensor"),
      "mlp/down": P(None, "tensor", "fsdp"),
      "router": P(None, None, None, None),
      "attn_norm/scale": P(None, None),
  }
  for name, spec in expected.items():
    leaf = functools.reduce(lambda d, k: d[k], name.split("/"), block)
    assert leaf.sharding.spec == spec, name
  assert state["params"]["embed"].sharding.spec == P("tensor", "fsdp")
  assert state["params"]["embed"].addressable_shards[0].data.shape == (264 // 2, 32 // 2)
  # Adam's moments follow their parameters; counters, step and RNG are replicated.
  opt_leaves = jax.tree_util.tree_leaves_with_path(state["opt_state"])
  kv_moments = [x for path, x in opt_leaves if jax.tree_util.keystr(path).endswith(
      "['segment_0']['block']['kv_proj']")]
  assert len(kv_moments) == 2  # mu and nu
  assert all(x.sharding.spec == expected["kv_proj"] for x in kv_moments)
  scalars = [x for _, x in opt_leaves if x.ndim == 0] + [state["step"]]
  assert scalars and all(x.sharding.is_fully_replicated for x in scalars)
  assert state["rng"].sharding.is_fully_replicated
  # Born sharded, yet the same numbers as the single-device init.
  ref_params = _reference("kv-static")[0]
  for x, y in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_rules_are_config_data():
  cfg = _cfg("kv-static")
  rules = [["batch", "data"], ["mlp", None], ["embed", "tensor"], ["heads", None],
           ["kv_heads", None], ["vocab", None]]
  layout = Layout.from_config(MeshConfig(data=2, tensor=4, rules=rules))
  abstract = jax.eval_shape(init_params_fn(cfg))
  shardings = sharding_lib.state_shardings(abstract, cfg.model, layout)
  block = shardings["layers"]["segment_0"]["block"]
  assert block["mlp"]["down"].spec == P(None, None, "tensor")
  assert block["kv_proj"].spec == P(None, "tensor", None, None, None)
  assert layout.batch_sharding(8).spec == P("data", None)


def init_params_fn(cfg):
  from lime_jax.model.transformer import init_params
  return lambda: init_params(cfg.model, jax.random.key(0))


def test_bad_meshes_and_rules_are_one_line_errors():
  cfg = _cfg("kv-static")
  abstract = jax.eval_shape(init_params_fn(cfg))
  narrow = load_experiment(None, [*TINY, "model.R=2"])  # 2 kv heads cannot split 4 ways
  with pytest.raises(ValueError, match=r"\(kv_heads\) has size 2, not divisible by 4") as exc:
    sharding_lib.state_shardings(jax.eval_shape(init_params_fn(narrow)), narrow.model,
                                 _layout("d2t4"))
  assert "\n" not in str(exc.value)
  with pytest.raises(ValueError, match=r"mesh: data=3 x fsdp=-1 x tensor=1 cannot fill 8 devices"):
    Layout.from_config(MeshConfig(data=3, fsdp=-1))
  with pytest.raises(ValueError, match=r"needs 16 devices, but 8 are in use"):
    Layout.from_config(MeshConfig(data=2, fsdp=8), jax.devices())
  with pytest.raises(ValueError, match=r"mesh: at most one of"):
    MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match=r"mesh.rules\[0\] \(embed\): unknown mesh axis 'model'"):
    MeshConfig(rules=[["embed", "model"]])
  with pytest.raises(ValueError, match=r"data.batch_size: global batch 6 is not divisible by"
                                       r" the 4 batch shards"):
    sharding_lib.check_batch(6, _layout("d2f2t2"))
  with pytest.raises(ValueError, match=r"config \(with overrides\): mesh.tensor: must be a"):
    load_experiment(None, [*TINY, "mesh.tensor=0"])
  assert sharding_lib.state_shardings(abstract, cfg.model, sharding_lib.single_device())


def test_checkpoint_from_one_mesh_resumes_on_another_with_the_same_losses(tmp_path):
  straight, moved = tmp_path / "straight", tmp_path / "moved"
  # 4 steps on data x fsdp x tensor; then 2 steps there and 2 more resumed on fsdp=8. (The
  # single-device equality of the step is the gradient test's; this reuses its programs.)
  mesh_a = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  train_lib.train(load_experiment(None, [*TINY, "run.steps=4", f"run.out_dir={straight}",
                                         *mesh_a]))
  train_lib.train(load_experiment(None, [*TINY, "run.steps=2", f"run.out_dir={moved}", *mesh_a]))
  resumed_cfg = load_experiment(None, [*TINY, "run.steps=4", f"run.out_dir={moved}",
                                       "mesh.fsdp=8"])
  result = train_lib.train(resumed_cfg)
  assert result.resumed_from == 2
  a, b = read_metrics(str(straight)), read_metrics(str(moved))
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
  np.testing.assert_allclose(b[-1]["val_loss"], a[-1]["val_loss"], rtol=1e-5)
  # The final checkpoint restores onto the fsdp=8 mesh with the rules' shardings.
  layout = Layout.from_config(resumed_cfg.mesh)
  init = train_lib.jitted_fns(resumed_cfg.model, resumed_cfg.optim, 0, layout)[0]
  restored = ckpt.restore(str(moved / "checkpoints"), train_lib.abstract_state(init))
  embed = restored.state["params"]["embed"]
  assert embed.sharding.mesh.shape["fsdp"] == 8 and embed.sharding.spec == P("tensor", "fsdp")
  assert embed.addressable_shards[0].data.shape == (264, 32 // 8)
