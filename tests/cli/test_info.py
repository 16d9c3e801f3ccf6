"""`sdtune info`: the published parameter counts, in a table whose columns line up."""

from sdtune.cli.main import main

# Published sizes of SDXL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_COUNTS = {
    "unet (UNet2DConditionModel)": 2_567_463_684,
    "text_encoder (CLIPTextModel)": 123_060_480,
    "text_encoder_2 (CLIPTextModelWithProjection)": 694_659_840,
    "vae (AutoencoderKL)": 83_653_863,
}


def test_info_sdxl_prints_the_published_counts_in_aligned_columns(capsys):
    assert main(["info", "sdxl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sdxl (full-size architecture): family sdxl"
    for label, count in SDXL_COUNTS.items():
        (row,) = [line for line in lines if line.startswith(label + " ")]
        assert row.split()[-2] == f"{count:,}", row
    # every number ends in the same column, whatever the length of the component's name
    table = [line for line in lines[1:] if line.endswith("%")]
    assert len({line.rindex(",") for line in table if "," in line}) == 1
    assert len({len(line) for line in table}) == 1
