"""The toy world: seeded scenes, captions in the shape the base was trained on, and a
classifier that reads shape and colour of rendered scenes."""

import random

import numpy as np

from sdtune.toy.measure import classifier_accuracy, classify, load_classifier
from sdtune.toy.world import (
    ALL_SHAPES,
    HELD_IN_SHAPES,
    HELD_OUT_SHAPE,
    TOY_POSE,
    Scene,
    all_scenes,
    render_scenes,
    sample_scenes,
)


def test_scenes_render_the_same_for_the_same_seed_and_differ_across_seeds():
    def render(seed):
        rng = random.Random(seed)
        return render_scenes(sample_scenes(6, ALL_SHAPES, rng), rng)

    assert np.array_equal(render(3), render(3))
    assert not np.array_equal(render(3), render(4))
    assert render(3).shape == (6, 64, 64, 3)


def test_captions_put_the_trigger_before_the_shape():
    scene = Scene("star", "red", "white")
    assert scene.caption() == "a red star on a white background"
    assert scene.caption("sks") == "a red sks star on a white background"


def test_the_held_out_shape_is_not_among_the_base_prompts():
    assert HELD_OUT_SHAPE not in HELD_IN_SHAPES
    assert all(s.shape != HELD_OUT_SHAPE for s in all_scenes(HELD_IN_SHAPES))
    assert len(all_scenes(HELD_IN_SHAPES)) == 45


def test_shipped_classifier_reads_shape_and_colour_of_fresh_renders():
    scores = classifier_accuracy(load_classifier(), count=400, seed=777)
    assert scores["shape"] >= 0.97
    assert scores["colour"] >= 0.97


def test_classifier_tells_each_shape_apart_in_a_blurred_image():
    from PIL import Image, ImageFilter

    rng = random.Random(5)
    scenes = [Scene(shape, "blue", "white") for shape in ALL_SHAPES]
    images = [
        Image.fromarray(a).filter(ImageFilter.GaussianBlur(1)) for a in render_scenes(scenes, rng)
    ]
    assert [shape for shape, _ in classify(load_classifier(), images)] == list(ALL_SHAPES)


def test_toy_pose_keeps_shapes_near_the_centre_and_the_judge_pose_does_not():
    from sdtune.data.synthetic import BACKGROUNDS
    from sdtune.toy.measure import JUDGE_POSE

    def centres(pose):
        rng = random.Random(11)
        scenes = sample_scenes(40, ALL_SHAPES, rng)
        out = []
        for scene, image in zip(scenes, render_scenes(scenes, rng, pose=pose), strict=True):
            shape = np.abs(image.astype(int) - BACKGROUNDS[scene.background]).sum(-1) > 30
            ys, xs = np.nonzero(shape)
            out.append(max(abs(xs.mean() - 31.5), abs(ys.mean() - 31.5)))
        return np.array(out)

    assert centres(TOY_POSE).max() <= 0.1 * 64 + 1.5  # jitter, plus the polygons' own offset
    assert centres(JUDGE_POSE).max() > 10


def test_a_ring_is_a_disc_with_a_hole_in_the_background_colour():
    from sdtune.data.synthetic import BACKGROUNDS, COLOURS, Pose, render_shape

    image = np.asarray(render_shape("ring", "red", "black", 64, random.Random(0), Pose(jitter=0)))
    centre = 32
    assert tuple(image[centre, centre]) == BACKGROUNDS["black"]  # the hole
    radius = next(
        r for r in range(centre) if tuple(image[centre, centre + r]) != BACKGROUNDS["black"]
    )
    assert tuple(image[centre, centre + radius + 2]) == COLOURS["red"]  # the band around it
    assert tuple(image[centre, 0]) == BACKGROUNDS["black"]  # and background outside
