"""The cross-layer method registry (model/mixers) and its interface, end to end with a toy method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lime_jax.config import CONNECTIONS, ROUTERS, ModelConfig
from lime_jax.model import flops, mixers, stack
from lime_jax.model import transformer as M
from lime_jax.model.mixers.base import Mixer

TINY = ModelConfig(V=32, D=16, L=3, H=2, F=32, T=8, router="none", scan_segments=2)


def test_registry_names_agree_with_the_config():
  assert set(mixers.MIXERS) == set(ROUTERS) | set(CONNECTIONS)
  assert all(issubclass(cls, Mixer) for cls in mixers.MIXERS.values())


@pytest.mark.parametrize("name", sorted(set(ROUTERS) | set(CONNECTIONS)))
def test_build_picks_the_method_of_the_config(name):
  field = "router" if name in ROUTERS else "connections"
  cfg = TINY.replace(**{field: name}, attn_res_blocks=2)  # 2 blocks of the 2L = 6 sub-layers
  mixer = mixers.build(cfg)
  assert type(mixer) is mixers.MIXERS[name]
  assert mixers.method_name(cfg) == name


class _ScaledLayers(Mixer):
  """A toy method: each layer's output is scaled by a learned scalar; the carry counts layers."""

  def start(self, stack_module, x_BxTxD):
    return x_BxTxD, jnp.zeros((), jnp.int32)

  def after_layer(self, block, stream, carry, layer_idx):
    scale = block.param("toy_scale", lambda rng: jnp.full((), 1.5, jnp.float32))
    return stream * scale, carry + 1

  def extra_params(self):
    return self.cfg.L


def test_a_new_method_plugs_in_through_the_registry_alone(monkeypatch):
  """Registering a Mixer subclass is all a method needs: its parameters sit in the layers'
  scope, scanned equals unrolled, and flops counts it."""
  monkeypatch.setitem(mixers.MIXERS, "none", _ScaledLayers)
  scan_cfg, unrolled_cfg = TINY, TINY.replace(scan_layers=False)
  params = M.init_params(scan_cfg, jax.random.key(0))
  assert params["layers"]["segment_0"]["block"]["toy_scale"].shape == (TINY.L,)
  tokens_BxT = jax.random.randint(jax.random.key(1), (2, 8), 0, TINY.V)
  scanned = M.Transformer(scan_cfg).apply({"params": params}, tokens_BxT)
  unrolled = M.Transformer(unrolled_cfg).apply(
      {"params": stack.convert_layout(params, scan_cfg, unrolled_cfg)}, tokens_BxT)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)
  stored = sum(x.size for x in jax.tree.leaves(params))
  assert stored == flops.total_params(TINY)

  monkeypatch.setitem(mixers.MIXERS, "none", Mixer)
  plain = M.Transformer(scan_cfg).apply({"params": M.init_params(scan_cfg, jax.random.key(0))},
                                        tokens_BxT)
  assert not np.allclose(plain, scanned)  # the toy method changed the model
