"""Initialisation from a pretrained vanilla model (spec section 7): each strategy maps the vanilla layers the spec
says onto each block position (checked by weights: vanilla layer i holds the value i everywhere), from a Hugging
Face directory and from a mor-jax checkpoint; config validation; placement into a train state. No torch needed."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from configs.base import get_config
from mor_jax import config as C
from mor_jax.config import ConfigError
from mor_jax.interop import hf, importer, layout, pretrained_init, weights
from mor_jax.interop.reference import LAYER_KEYS

pytestmark = pytest.mark.usefixtures("fast_compilation")

L, V, D, F = 8, 64, 16, 32


def vanilla_dir(path, *, num_layers=L, tied=True, vocab=V):
  """A Hugging Face Llama directory whose layer i has every weight equal to i (norms: 100 + i)."""
  os.makedirs(path, exist_ok=True)
  hf.write_json({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": D,
                 "intermediate_size": F, "num_hidden_layers": num_layers, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
                 "rope_theta": 10000.0, "tie_word_embeddings": tied}, os.path.join(path, "config.json"))
  shapes = {"self_attn.q_proj.weight": (D, D), "self_attn.k_proj.weight": (D // 2, D),
            "self_attn.v_proj.weight": (D // 2, D), "self_attn.o_proj.weight": (D, D),
            "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
            "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,)}
  sd = {"model.embed_tokens.weight": np.arange(vocab * D, dtype=np.float32).reshape(vocab, D) / 1000,
        "model.norm.weight": np.full((D,), 7.0, np.float32)}
  for i in range(num_layers):
    for suffix, shape in shapes.items():
      sd[f"model.layers.{i}.{suffix}"] = np.full(shape, 100.0 + i if "norm" in suffix else float(i), np.float32)
  if not tied:
    sd["lm_head.weight"] = -sd["model.embed_tokens.weight"]
  hf.write_safetensors(sd, os.path.join(path, "model.safetensors"))
  return path


def config(strategy, R, init="stepwise", src="", mor=False, **model):
  c = get_config()
  c.model.update(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=2, num_kv_heads=1,
                 max_seq_len=64, **model)
  c.recursion.update(strategy=strategy, num_recursions=R)
  c.mor.enable = mor
  c.init.update(from_path=src, strategy=init)
  c.data.seq_len = 16
  c.train.update(total_batch_size=4, per_device_batch_size=1)
  return c


def fresh(cfg, seed=0):
  abstract = weights.abstract_params(cfg)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def block_sources(cfg, params):
  """Per block position: the value its q_proj holds (= the vanilla layer index, or the mean of several)."""
  p = layout.to_stacked_layout(cfg, params)
  q = p["block"]["layers"]["attn"]["q_proj"]["kernel"]
  for sub in LAYER_KEYS:                      # every tensor of a position comes from the same vanilla layers
    node = p["block"]["layers"]
    for name in sub:
      node = node[name]
    for j in range(cfg.base_depth):
      expected = q[j].flat[0] + (100.0 if "norm" in sub[0] else 0.0)
      np.testing.assert_allclose(node[j], expected, err_msg=str(sub))
  return [float(q[j].flat[0]) for j in range(cfg.base_depth)]


# (sharing, R) -> strategy -> the vanilla layers (L = 8) per block position, from spec section 7
EXPECTED = {
    ("cycle", 2): {"stepwise": [0, 2, 5, 7], "lower": [0, 1, 2, 3], "upper": [4, 5, 6, 7],
                   "average": [(0 + 4) / 2, (1 + 5) / 2, (2 + 6) / 2, (3 + 7) / 2]},
    ("sequence", 2): {"stepwise": [0, 2, 5, 7], "lower": [0, 1, 2, 3], "upper": [4, 5, 6, 7],
                      "average": [0.5, 2.5, 4.5, 6.5]},
    ("middle_cycle", 2): {"stepwise": [1, 4, 6], "lower": [1, 2, 3], "upper": [4, 5, 6],
                          "average": [(1 + 4) / 2, (2 + 5) / 2, (3 + 6) / 2]},
    ("middle_sequence", 3): {"stepwise": [1, 6], "lower": [1, 2], "upper": [5, 6], "average": [2.0, 5.0]},
    ("none", 1): {"stepwise": list(range(L))},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  return vanilla_dir(str(tmp_path_factory.mktemp("pretrained") / "vanilla"))


@pytest.mark.parametrize("sharing,R", list(EXPECTED))
def test_each_strategy_maps_the_spec_layers(source, sharing, R):
  for strategy, expected in EXPECTED[(sharing, R)].items():
    c = C.validate(config(sharing, R, strategy, source))
    cfg = C.model_config(c)
    params = pretrained_init.initial_params(c, cfg, fresh(cfg))
    assert block_sources(cfg, params) == pytest.approx(expected), strategy
    p = layout.to_stacked_layout(cfg, params)
    if cfg.has_middle:                                   # unique first / last layers copy vanilla 0 / L-1
      assert np.all(p["first"]["attn"]["q_proj"]["kernel"] == 0)
      assert np.all(p["last"]["mlp"]["up_proj"]["kernel"] == L - 1)
      assert np.all(p["last"]["input_norm"]["scale"] == 100 + L - 1)
    sd = hf.read_state_dict(source)
    np.testing.assert_array_equal(p["embed"]["embedding"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(p["lm_head"]["kernel"], sd["model.embed_tokens.weight"].T)   # tied source head
    np.testing.assert_array_equal(p["final_norm"]["scale"], sd["model.norm.weight"])


def test_random_strategy_is_a_seeded_sorted_choice(source):
  picks = {}
  for seed in (0, 1, 2):
    c = config("middle_cycle", 2, "random", source)
    c.train.seed = seed
    c = C.validate(c)
    cfg = C.model_config(c)
    got = block_sources(cfg, pretrained_init.initial_params(c, cfg, fresh(cfg)))
    assert got == sorted(got) and len(set(got)) == 3 and all(1 <= x <= L - 2 for x in got)
    # the reference: sorted(np.random.choice(range(1, L - 1), base_depth, replace=False)) after np.random.seed
    np.random.seed(seed)
    assert got == sorted(np.random.choice(range(1, L - 1), 3, replace=False).tolist())
    picks[seed] = tuple(got)
  assert len(set(picks.values())) > 1


def test_mor_routers_keep_their_fresh_init_and_untied_heads_copy(tmp_path):
  src = vanilla_dir(str(tmp_path / "untied"), tied=False)
  c = C.validate(config("middle_cycle", 2, "lower", src, mor=True))
  cfg = C.model_config(c)
  init = fresh(cfg)
  params = pretrained_init.initial_params(c, cfg, init)
  assert block_sources(cfg, params) == [1, 2, 3]
  for r in range(2):
    np.testing.assert_array_equal(params[f"router_{r}"]["dense"]["kernel"], init[f"router_{r}"]["dense"]["kernel"])
  np.testing.assert_array_equal(params["lm_head"]["kernel"], -hf.read_state_dict(src)["model.embed_tokens.weight"].T)


def test_from_a_mor_jax_checkpoint_and_with_more_source_layers(source, tmp_path):
  # a vanilla mor-jax checkpoint (written like an import) as the source: same mapping as the HF directory
  vc = config("none", 1)
  vcfg = C.model_config(C.validate(vc))
  vparams = pretrained_init.pretrained_params(vcfg, hf.read_state_dict(source), L, "stepwise")
  importer.write_checkpoint(vc, vparams, str(tmp_path / "vanilla_run"))
  c = C.validate(config("cycle", 2, "average", str(tmp_path / "vanilla_run"), scan_layers=False))
  cfg = C.model_config(c)
  params = pretrained_init.initial_params(c, cfg, fresh(cfg))
  assert "layer_0" in params["block"]                                  # unrolled block layout
  assert block_sources(cfg, params) == [2.0, 3.0, 4.0, 5.0]
  # a 10-layer source for an 8-layer middle_cycle model: first/last kept, the middle re-picked by linspace
  big = vanilla_dir(str(tmp_path / "ten"), num_layers=10)
  c = C.validate(config("middle_cycle", 2, "lower", big))
  cfg = C.model_config(c)
  keep = pretrained_init.repick(10, cfg)
  assert keep == [0, 1, 2, 4, 5, 7, 8, 9]                             # [0] + round(linspace(1, 8, 6)) + [9]
  params = layout.to_stacked_layout(cfg, pretrained_init.initial_params(c, cfg, fresh(cfg)))
  assert block_sources(cfg, params) == [1, 2, 4]
  assert np.all(params["last"]["attn"]["o_proj"]["kernel"] == 9)


def test_config_and_source_errors_name_the_field(source, tmp_path):
  with pytest.raises(ConfigError, match=r"config\.init\.strategy: unknown (strategy|value) 'best'"):
    C.validate(config("cycle", 2, "best", source))
  with pytest.raises(ConfigError, match=r"config\.init\.strategy: 'average'.*recursion\.strategy"):
    C.validate(config("none", 1, "average", source))
  raw = config("cycle", 2, "lower").to_dict()
  raw["init"]["from_path"] = 3                      # e.g. a config read from JSON
  with pytest.raises(ConfigError, match=r"config\.init\.from_path: must be a (path|string)"):
    C.validate(ml_collections.ConfigDict(raw))

  def check(c):
    c = C.validate(c)
    pretrained_init.check_source(c, C.model_config(c))

  with pytest.raises(ConfigError, match=r"config\.init\.from_path: .*does not exist"):
    check(config("cycle", 2, "lower", str(tmp_path / "missing")))
  os.makedirs(tmp_path / "notamodel")
  with pytest.raises(ConfigError, match=r"config\.init\.from_path: .*neither"):
    check(config("cycle", 2, "lower", str(tmp_path / "notamodel")))
  with pytest.raises(ConfigError, match=r"config\.model\.vocab_size: .*vocabulary mismatch"):
    check(config("cycle", 2, "lower", vanilla_dir(str(tmp_path / "v128"), vocab=128)))
  with pytest.raises(ConfigError, match=r"config\.model\.num_layers: is 8 .* only 4 layers"):
    check(config("cycle", 2, "lower", vanilla_dir(str(tmp_path / "four"), num_layers=4)))
  with pytest.raises(ConfigError, match=r"config\.model\.tie_embeddings"):
    c = C.validate(config("cycle", 2, "lower", vanilla_dir(str(tmp_path / "untied"), tied=False), tie_embeddings=True))
    pretrained_init.initial_params(c, C.model_config(c), fresh(C.model_config(c)))
  # a workdir that will resume never reads the source (which may be gone by then)
  os.makedirs(tmp_path / "resume" / "checkpoints" / "4")
  c = C.validate(config("cycle", 2, "lower", str(tmp_path / "missing")))
  pretrained_init.check_source(c, C.model_config(c), str(tmp_path / "resume"))


def test_apply_to_a_placed_train_state(source):
  """What the training loop does on a fresh run: pretrained leaves replace the fresh ones with their shardings."""
  import jax.numpy as jnp  # noqa: PLC0415
  from mor_jax.train.parallel import DataParallel  # noqa: PLC0415
  from mor_jax.train.state import TrainState  # noqa: PLC0415
  c = C.validate(config("middle_cycle", 2, "stepwise", source, mor=True), num_devices=4)
  cfg = C.model_config(c)
  init = fresh(cfg)
  dp = DataParallel("pjit", jax.devices()[:4])
  state = dp.place_state(TrainState(step=jnp.zeros((), jnp.int32), params=init, opt_state={}, router_bias={},
                                    rng=jnp.zeros((2,), jnp.uint32)))
  new = pretrained_init.apply_to_state(c, cfg, state, dp)
  assert block_sources(cfg, jax.device_get(new.params)) == [1, 4, 6]
  np.testing.assert_array_equal(jax.device_get(new.params["router_1"]["dense"]["kernel"]),
                                init["router_1"]["dense"]["kernel"])
  old_sh = jax.tree.map(lambda a: a.sharding, state.params)
  new_sh = jax.tree.map(lambda a: a.sharding, new.params)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a == b, old_sh, new_sh)) and \
      all(jax.tree.leaves(jax.tree.map(lambda a, b: a == b, old_sh, new_sh)))


# ------------------------------------------------------------------ middle_cycle R = 2 and R = 3, one test per strategy
def layer_schedule(cfg, params):
  """The vanilla layer each of the model's L layer applications was initialised from, in execution order (the
  mean for 'average'): middle_cycle runs first, the block positions 0..base-1 R times, then last."""
  p = layout.to_stacked_layout(cfg, params)
  block = block_sources(cfg, params)                     # also checks every tensor of a position agrees
  first = float(p["first"]["attn"]["q_proj"]["kernel"].flat[0])
  last = float(p["last"]["mlp"]["down_proj"]["kernel"].flat[0])
  for part, value in (("first", first), ("last", last)):  # unique layers: one source layer in every tensor
    for sub in LAYER_KEYS:
      node = p[part]
      for name in sub:
        node = node[name]
      np.testing.assert_array_equal(node, value + (100.0 if "norm" in sub[0] else 0.0), err_msg=f"{part} {sub}")
  return [first] + block * cfg.recursions + [last]


def initialised(source, strategy, R, seed=0):
  c = config("middle_cycle", R, strategy, source)
  c.train.seed = seed
  c = C.validate(c)
  cfg = C.model_config(c)
  assert cfg.num_layers == L and cfg.base_depth == (L - 2) // R
  return layer_schedule(cfg, pretrained_init.initial_params(c, cfg, fresh(cfg)))


@pytest.mark.parametrize("R,expected", [(2, [0, 1, 4, 6, 1, 4, 6, 7]), (3, [0, 1, 6, 1, 6, 1, 6, 7])])
def test_stepwise_middle_cycle(source, R, expected):
  """Block position i <- vanilla layer round(linspace(1, L-2, base))[i]: spread evenly over the middle layers."""
  assert initialised(source, "stepwise", R) == expected


@pytest.mark.parametrize("R,expected", [(2, [0, 1, 2, 3, 1, 2, 3, 7]), (3, [0, 1, 2, 1, 2, 1, 2, 7])])
def test_lower_middle_cycle(source, R, expected):
  """Block position i <- vanilla layer i + 1: the lowest middle layers."""
  assert initialised(source, "lower", R) == expected


@pytest.mark.parametrize("R,expected", [(2, [0, 4, 5, 6, 4, 5, 6, 7]), (3, [0, 5, 6, 5, 6, 5, 6, 7])])
def test_upper_middle_cycle(source, R, expected):
  """Block position i <- the base middle layers just below the last layer."""
  assert initialised(source, "upper", R) == expected


@pytest.mark.parametrize("R,expected", [
    (2, [0] + [(1 + 4) / 2, (2 + 5) / 2, (3 + 6) / 2] * 2 + [7]),
    (3, [0] + [(1 + 3 + 5) / 3, (2 + 4 + 6) / 3] * 3 + [7])])
def test_average_middle_cycle(source, R, expected):
  """Block position i <- the mean of the vanilla layers the cycle runs at position i (1 + i + r * base)."""
  assert initialised(source, "average", R) == pytest.approx(expected)


@pytest.mark.parametrize("R,expected", [(2, [0, 2, 3, 6, 2, 3, 6, 7]), (3, [0, 3, 6, 3, 6, 3, 6, 7])])
def test_random_middle_cycle(source, R, expected):
  """Block positions <- a sorted random choice of base middle layers, seeded by train.seed (seed 0 here; the
  expected layers are the reference's sorted(np.random.choice(range(1, L-1), base, replace=False)))."""
  assert initialised(source, "random", R) == expected
  np.random.seed(0)
  base = (L - 2) // R
  assert expected[1:1 + base] == sorted(np.random.choice(range(1, L - 1), base, replace=False).tolist())
  assert initialised(source, "random", R, seed=1) != expected                # another seed, other layers
