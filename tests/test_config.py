import pytest

from lime_jax.config import ModelConfig


def test_defaults_fill_kv_heads_and_head_size():
  cfg = ModelConfig(D=256, H=8)
  assert cfg.R == 8 and cfg.Hd == 32 and cfg.is_lime


@pytest.mark.parametrize("changes, field", [
    (dict(H=6, R=4, D=240), "R"),
    (dict(D=256, H=4, Hd=32), "Hd"),
    (dict(router="softmax"), "router"),
    (dict(L=0), "L"),
    (dict(D=-8), "D"),
    (dict(F=0), "F"),
    (dict(V=3.5), "V"),
    (dict(L=True), "L"),
    (dict(remat_policy="most"), "remat_policy"),
    (dict(compute_dtype="int8"), "compute_dtype"),
    (dict(D=250, H=4), "Hd"),
    (dict(D=60, H=4, Hd=15), "Hd"),
    (dict(scan_segments=0), "scan_segments"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(kv_init="xavier"), "kv_init"),
    (dict(push_raw_kv="checkpoint"), "push_raw_kv"),
    (dict(routing_impl="gather"), "routing_impl"),
    (dict(kv_init="baseline", router="none"), "kv_init"),
    (dict(router_init_scale=-0.5), "router_init_scale"),
    (dict(router_init_scale=0.5, router="hidden-static"), "router_init_scale"),
])
def test_bad_values_name_the_field(changes, field):
  with pytest.raises(ValueError, match=rf"ModelConfig\.{field}:"):
    ModelConfig(**changes)


def test_from_dict_rejects_unknown_keys_and_wrong_types():
  assert ModelConfig.from_dict({"L": 4, "rope_theta": 500}).rope_theta == 500.0
  with pytest.raises(ValueError, match=r"model: unknown key\(s\) \['layers'\]"):
    ModelConfig.from_dict({"layers": 4})
  with pytest.raises(ValueError, match=r"model\.L: expected int, got str"):
    ModelConfig.from_dict({"L": "4"})
  with pytest.raises(ValueError, match=r"model\.scan_layers: expected bool"):
    ModelConfig.from_dict({"scan_layers": "yes"})


def test_round_trip_through_dict():
  cfg = ModelConfig(L=3, H=4, R=2, router="none", scan_layers=False)
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
