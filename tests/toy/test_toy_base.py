"""The shipped toy base is an ordinary SD 1 diffusers folder that draws what it is asked."""

import torch

from sdtune.toy import TOY_BASE_DIR


def test_base_is_small_and_loads_as_sd1_in_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    from sdtune.models.families import detect_family

    size = sum(f.stat().st_size for f in TOY_BASE_DIR.rglob("*") if f.is_file())
    assert size < 22 * 10**6  # 21.6 MB: the 5.8 M-parameter U-Net is 11.7 MB of it
    pipe = StableDiffusionPipeline.from_pretrained(TOY_BASE_DIR)
    assert detect_family(pipe).name == "sd1"
    assert detect_family(TOY_BASE_DIR).name == "sd1"
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.tokenizer.model_max_length == 77
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_base_draws_the_asked_shape_and_colour_of_held_in_prompts():
    from sdtune.generate.run import load_base
    from sdtune.toy.eval import draw
    from sdtune.toy.measure import classify, load_classifier
    from sdtune.toy.world import Scene

    scenes = [
        Scene(shape, colour, background)
        for shape, colour, background in [
            ("circle", "red", "white"),
            ("square", "blue", "grey"),
            ("triangle", "yellow", "black"),
            ("circle", "green", "black"),
            ("square", "purple", "white"),
            ("triangle", "red", "grey"),
            ("circle", "blue", "white"),
            ("square", "yellow", "grey"),
            ("triangle", "green", "white"),
            ("circle", "purple", "grey"),
            ("square", "red", "black"),
            ("triangle", "blue", "black"),
        ]
    ]
    images = draw(load_base(str(TOY_BASE_DIR)), [s.caption() for s in scenes], list(range(12)))
    found = classify(load_classifier(), images)
    shapes = sum(f[0] == s.shape for f, s in zip(found, scenes, strict=True))
    colours = sum(f[1] == s.colour for f, s in zip(found, scenes, strict=True))
    assert shapes >= 9, found
    assert colours >= 10, found
