"""Make the `--io` reference file that `trainer check-hf` compares an mllama checkpoint against,
from any Hugging Face mllama checkpoint (the published Llama 3.2 11B Vision among them), with
transformers:

    python scripts/reference/hf_io.py --model DIR --out io.safetensors [--image CELL.jpg]
    trainer check-hf --model DIR --io io.safetensors      # exit 0 within 1e-4 relative

With --image and the checkpoint's own processor in DIR (preprocessor_config.json and the
tokenizer, as the published checkpoint ships them): the image processor's tiles and the chat
prompt a user would send with a cell. Otherwise seeded random inputs: one single-tile image,
two text tokens before the image token, which see no image, and text after it.

Writes input_ids, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask (the
inputs), vision_output (the vision model's last_hidden_state) and logits, in f32. The model runs
in f32 whatever the checkpoint holds (bf16 arithmetic would differ from the port's f32 by far
more than check-hf's tolerance): for 11B about 43 GB of host memory plus one forward pass.

Needs torch, transformers, safetensors and pillow (PyPI); no network (HF_HUB_OFFLINE).
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from transformers import MllamaForConditionalGeneration

PROMPT = "What type of white blood cell is this? Answer with its class, then describe it."


def processor_inputs(model_dir, image_path, prompt):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(image_path).convert("RGB")
    x = processor(images=image, text=text, add_special_tokens=False, return_tensors="pt")
    return {k: x[k] for k in ("input_ids", "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")}


def random_inputs(cfg, seed):
    v, t = cfg.vision_config, cfg.text_config
    g = torch.Generator().manual_seed(seed)
    seq = 9
    ids = torch.randint(3, min(t.vocab_size, cfg.image_token_index), (1, seq), generator=g)
    ids[0, 0] = 1
    ids[0, 3] = cfg.image_token_index
    tiles, size = v.max_num_tiles, v.image_size
    pixel = torch.randn(1, 1, tiles, 3, size, size, generator=g)
    pixel[0, 0, 1:] = 0  # padding tiles are zeros, as the image processor pads them
    ratios = [list(r) for r in v.supported_aspect_ratios]
    ar_ids = torch.tensor([[ratios.index([1, 1]) + 1]])
    ar_mask = torch.zeros(1, 1, tiles, dtype=torch.long)
    ar_mask[0, 0, 0] = 1
    xmask = torch.zeros(1, seq, 1, tiles, dtype=torch.long)
    xmask[0, 3:, 0, 0] = 1
    return dict(input_ids=ids, pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask, cross_attention_mask=xmask)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors)")
    ap.add_argument("--out", required=True, help="io.safetensors to write")
    ap.add_argument("--image", help="a cell image, used with the checkpoint's own processor")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()

    model = MllamaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32).eval()
    has_processor = os.path.exists(os.path.join(a.model, "preprocessor_config.json"))
    if a.image and not has_processor:
        ap.error(f"--image needs the checkpoint's processor (no preprocessor_config.json in {a.model})")
    x = processor_inputs(a.model, a.image, a.prompt) if a.image else random_inputs(model.config, a.seed)
    with torch.no_grad():
        vision = model.model.vision_model(
            pixel_values=x["pixel_values"].float(),
            aspect_ratio_ids=x["aspect_ratio_ids"],
            aspect_ratio_mask=x["aspect_ratio_mask"],
        ).last_hidden_state
        logits = model(**x).logits
    io = {k: v.contiguous() for k, v in x.items()}
    io["pixel_values"] = io["pixel_values"].float().contiguous()
    io["vision_output"] = vision.float().contiguous()
    io["logits"] = logits.float().contiguous()
    save_file(io, a.out)
    shapes = {k: list(v.shape) for k, v in io.items()}
    print(f"wrote {a.out}: {shapes}")


if __name__ == "__main__":
    main()
