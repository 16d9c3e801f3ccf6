from PIL import Image

from sdtune.generate.outputs import GenerationParams, save_grid, save_png


def test_png_carries_a1111_parameters_and_never_overwrites(tmp_path):
    params = GenerationParams(
        prompt="a cat",
        negative_prompt="blurry",
        steps=20,
        guidance_scale=7.0,
        seed=42,
        width=64,
        height=64,
        scheduler="PNDMScheduler",
        model="tiny",
        adapters=[("/x/style.safetensors", 0.8)],
    )
    first = save_png(Image.new("RGB", (64, 64), "red"), tmp_path, params, "seed42")
    second = save_png(Image.new("RGB", (64, 64), "blue"), tmp_path, params, "seed42")
    assert first.name == "seed42.png" and second.name == "seed42-1.png"
    assert Image.open(first).getpixel((0, 0)) == (255, 0, 0)  # the first file is untouched
    text = Image.open(first).text["parameters"]
    assert text.splitlines()[0] == "a cat"
    assert text.splitlines()[1] == "Negative prompt: blurry"
    for field in (
        "Steps: 20",
        "CFG scale: 7",
        "Seed: 42",
        "Size: 64x64",
        'Lora: "style.safetensors:0.8"',  # quoted: it holds a colon
    ):
        assert field in text


def test_grid_tiles_images(tmp_path):
    images = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    grid = Image.open(save_grid(images, tmp_path, "grid", GenerationParams("x"), columns=2))
    assert grid.size == (16, 16) and grid.getpixel((12, 4)) == (0, 128, 0)
