"""Typed config: YAML files, key=value overrides, and one-line errors that name the problem."""

import glob
import os

import pytest

from glm_jax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.name == os.path.basename(path)[: -len(".yaml")]


def test_overrides_are_typed():
    cfg = load_config(
        os.path.join(ROOT, "configs/glm-tiny.yaml"),
        ["train.steps=20", "mesh.data=2", "mesh.model=4", "workdir=runs/tiny", "model.attention_impl=xla", "model.dtype=bfloat16", "train.learning_rate=1e-4"],
    )
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert (cfg.mesh.data, cfg.mesh.model) == (2, 4)
    assert cfg.workdir == "runs/tiny"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.train.learning_rate == 1e-4


def test_130b_and_chatglm_configs_carry_the_spec_values():
    c = load_config(os.path.join(ROOT, "configs/glm-130b.yaml")).model
    assert (c.num_layers, c.hidden_size, c.num_heads, c.mlp_dim, c.vocab_size) == (70, 12288, 96, 32768, 150528)
    assert c.alpha == pytest.approx(140 ** 0.5) and c.embedding_grad_shrink == 0.1 and c.tie_embeddings
    assert (c.mlp_type, c.gelu_approximate, c.position_encoding, c.norm_order) == ("geglu", False, "rotary_1d", "post")
    c = load_config(os.path.join(ROOT, "configs/chatglm-6b.yaml")).model
    assert c.alpha == pytest.approx(56 ** 0.5) and not c.tie_embeddings and c.vocab_size == 130528
    assert (c.mlp_type, c.gelu_approximate, c.position_encoding) == ("gelu", True, "rotary_2d")
    legacy = load_config(os.path.join(ROOT, "configs/chatglm-6b-legacy.yaml")).model
    assert (legacy.vocab_size, legacy.gmask_token_id, legacy.sop_token_id, legacy.pad_token_id) == (150528, 150001, 150004, 20003)
    assert legacy.num_layers == 28 and legacy.position_encoding == "rotary_2d"  # the rest comes from its base


def test_base_file_cycles_and_bad_sections_are_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model must be a mapping"):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden_size=3", "unknown config key 'model.hiden_size'; valid keys here: "),
        ("trian.steps=3", "unknown config key 'trian'"),
        ("model.hidden_size=-8", "model.hidden_size must be > 0, got -8"),
        ("model.num_layers=0", "model.num_layers must be > 0, got 0"),
        ("model.hidden_size=65", "model.hidden_size (65) must be divisible by model.num_heads (4)"),
        ("model.attention_impl=cuda", "model.attention_impl='cuda' is not valid; valid values: auto, xla, pallas"),
        ("train.steps=ten", "train.steps='ten' is not valid; expected an integer"),
        ("model.scan_layers=maybe", "model.scan_layers='maybe' is not valid; expected true or false"),
        ("mesh.model=0", "mesh.model must be a positive size or -1 (fill), got 0"),
        ("train.seq_len=4096", "train.seq_len (4096) exceeds model.max_seq_len (256)"),
        ("model.sop_token_id=5000", "model.sop_token_id=5000 is outside the vocabulary [0, 1024)"),
        ("steps", "override 'steps' must look like key=value"),
    ],
)
def test_bad_input_names_the_problem(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs/glm-tiny.yaml"), [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_derived_model_facts_are_config_properties():
    """Facts other modules derive from the model config, stated once (MODEL.md §8)."""
    want = {  # name: (head_dim, 2-D positions, rotary dims per table, alpha)
        "glm-130b": (128, False, 128, 140 ** 0.5),
        "chatglm-6b": (128, True, 64, 56 ** 0.5),
        "glm-large": (64, True, 0, 1.0),
        "glm-tiny": (16, False, 16, 2.0),
    }
    for name, (head_dim, two_d, rotary, alpha) in want.items():
        m = load_config(name).model
        assert (m.head_dim, m.two_d_positions, m.rotary_dim) == (head_dim, two_d, rotary), name
        assert m.alpha == pytest.approx(alpha), name
