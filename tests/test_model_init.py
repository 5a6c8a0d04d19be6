"""A model initialised from scratch must see its image: the main job trains one, and with a too-small init
the visual tokens reached the LLM at ~1e-6 of the text embeddings, so training learned to ignore them."""

import numpy as np
from PIL import Image, ImageDraw
from ref_model import image_inputs, tiny_config

from molmo2_jax.api import Molmo2Model
from molmo2_jax.config import from_hf_config
from molmo2_jax.params import init_params


def test_a_small_object_moves_the_untrained_models_logits():
    config = from_hf_config(tiny_config("qwen3").to_dict())
    model = Molmo2Model(config, init_params(config, seed=0))
    blank = Image.new("RGB", (224, 224), (255, 255, 255))
    with_object = blank.copy()
    ImageDraw.Draw(with_object).rectangle([100, 60, 128, 88], fill=(220, 40, 40))
    last = [np.asarray(model(image_inputs([image])))[0, -1] for image in (blank, with_object)]
    # a 28-pixel square among ~100 visual tokens moves the logits by ~3% of their spread (1e-6 with a 0.02 init)
    assert np.abs(last[1] - last[0]).max() > 3e-3 * last[0].std()
