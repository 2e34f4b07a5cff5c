"""MACs per UNet step of O2MKD students at the real SD 1.5 and SDXL-base shapes (no download, no weights).

Both teachers' UNets are built from their published ``unet/config.json`` (written out below) on the ``meta``
device, so nothing is allocated or computed; students are derived with ``o2mkd_ray.core.student_config`` exactly as
a distill run derives them. Params and MACs are ``o2mkd_ray.core.costs.forward_cost``'s (the project's one cost
definition: ``torch.utils.flop_counter`` matmuls, convolutions and attention, MACs = FLOPs / 2, batch 1, one
UNet call without guidance): SD 1.5 at 64x64 latents (512 px) with 77 text tokens of width 768; SDXL at 128x128
latents (1024 px) with 77 tokens of width 2048 and its ``text_time`` added conditioning (pooled text (1, 1280),
time ids (1, 6)). Classifier-free guidance doubles every figure and leaves the ratios unchanged.

    .venv/bin/python benchmarks/sdxl_macs.py            # prints a markdown table
"""

from __future__ import annotations

import argparse

# runwayml/stable-diffusion-v1-5 unet/config.json (859.5M parameters)
SD15 = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.567B parameters), keys at their defaults omitted
SDXL_BASE = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}

# (label, student_config keyword arguments); BK-SDM: fewer resnet(+attention) layers per block, no mid block;
# KOALA-like: fewer transformer layers in SDXL's deep attention blocks (the 10-layer stage holds most of its MACs)
SD15_STUDENTS = [
    ("width 0.75", {"width": 0.75}),
    ("width 0.5", {"width": 0.5}),
    ("BK-SDM-Base (layers_per_block 1)", {"width": 1.0, "layers_per_block": 1}),
    ("BK-SDM-Small (+ no mid block)", {"width": 1.0, "layers_per_block": 1, "drop_mid_block": True}),
    ("width 0.5 + BK-SDM-Small", {"width": 0.5, "layers_per_block": 1, "drop_mid_block": True}),
]
SDXL_STUDENTS = [
    ("width 0.75", {"width": 0.75}),
    ("width 0.5", {"width": 0.5}),
    ("transformer layers (1, 2, 5)", {"width": 1.0, "transformer_layers_per_block": [1, 2, 5]}),
    ("transformer layers (1, 2, 2)", {"width": 1.0, "transformer_layers_per_block": [1, 2, 2]}),
    ("BK-SDM-Base (layers_per_block 1)", {"width": 1.0, "layers_per_block": 1}),
    ("BK-SDM-Small (+ no mid block)", {"width": 1.0, "layers_per_block": 1, "drop_mid_block": True}),
    ("KOALA-like: layers_per_block 1, transformer layers (1, 2, 5), no mid block",
     {"width": 1.0, "layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5], "drop_mid_block": True}),
    ("width 0.75 + KOALA-like", {"width": 0.75, "layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5],
                                 "drop_mid_block": True}),
]


def rows(name: str, teacher_cfg: dict, students: list) -> list[tuple]:
    """``(model, variant, params, GMACs, MACs ratio)`` of the teacher and each student, built on the meta device."""
    import torch

    from o2mkd_ray.core.costs import forward_cost
    from o2mkd_ray.core.student_config import make_unet, student_config

    shape = (teacher_cfg["in_channels"], teacher_cfg["sample_size"], teacher_cfg["sample_size"])
    with torch.device("meta"):
        teacher = make_unet(teacher_cfg, name)
        base = forward_cost(teacher, shape, seq_len=77)
        out = [(name, "teacher", base["params"], base["macs"], 1.0)]
        for label, kw in students:
            cfg = student_config(teacher_cfg, kw.pop("width"), **kw)
            cost = forward_cost(make_unet(cfg, label), shape, seq_len=77)
            out.append((name, label, cost["params"], cost["macs"], cost["macs"] / base["macs"]))
    return out


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    table = rows("SD 1.5 (512 px)", SD15, [(k, dict(v)) for k, v in SD15_STUDENTS])
    table += rows("SDXL base (1024 px)", SDXL_BASE, [(k, dict(v)) for k, v in SDXL_STUDENTS])
    print("| teacher | UNet | params | GMACs / step | MACs ratio |")
    print("|---|---|---|---|---|")
    for model, label, params, macs, ratio in table:
        print(f"| {model} | {label} | {params / 1e6:,.1f} M | {macs / 1e9:,.1f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
