"""SDXL caption data: both text encoders, the pooled embedding and the time ids, exactly as
StableDiffusionXLPipeline feeds its UNet."""

import torch
from conftest import PROMPTS


def test_sdxl_condition_equals_the_pipelines_own(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from o2mkd_ray.core.fixtures import make_tiny_sdxl
    from o2mkd_ray.core.sdxl import encode_sdxl_prompts, load_sdxl_components

    make_tiny_sdxl(tmp_path / "xl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl")
    parts = load_sdxl_components(str(tmp_path / "xl"))
    assert parts.unet is None  # the UNet is not loaded twice
    cond, uncond = encode_sdxl_prompts(parts, PROMPTS, 16, 16, batch_size=2)  # 2: batching must not change rows
    pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["text_embeds"], pp)
    assert torch.equal(uncond["encoder_hidden_states"], ne[:1]) and torch.equal(uncond["text_embeds"], npp[:1])
    assert pipe.config.force_zeros_for_empty_prompt and not uncond["text_embeds"].any()  # SDXL's zero negatives
    ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond["time_ids"], ids.expand(len(PROMPTS), 6)) and torch.equal(uncond["time_ids"], ids)
