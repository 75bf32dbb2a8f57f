"""Generate small random-weight Llama 3.2 Vision (mllama) checkpoints and reference outputs from
transformers, for the Rust port's parity tests (shared/models/src/mllama).

Regenerate (from the repository root; CPU only, no network besides PyPI for the venv):

    python3 -m venv .cache/pyref
    .cache/pyref/bin/pip install torch transformers safetensors numpy
    .cache/pyref/bin/python scripts/reference/gen_mllama.py

Last run with: torch 2.15.0 (+cu132 wheel, run on CPU), transformers 5.24.0, safetensors 0.7,
numpy 2.4.6, Python 3.11.7. Seeded: the same versions write the same files.

Each configuration exercises paths the 11B model uses: GQA or not, llama3 rope scaling or the
default rope, one or more cross-attention layers, 1 and 4 tiles, text rows that see no image,
single-file and sharded checkpoints, f32 and bf16 weights. transformers initialises the tanh
gates at zero (a random model would ignore the image); here every gate is opened.

Outputs, per configuration, in shared/fixtures/mllama/<name>/:
  config.json, model.safetensors or model-0000K-of-0000N.safetensors + model.safetensors.index.json
  io.safetensors: input_ids [B,S] (i64), pixel_values [B,1,T,3,H,W], aspect_ratio_ids [B,1] (i64),
      aspect_ratio_mask [B,1,T] (i64), cross_attention_mask [B,S,1,T] (i64), vision_output
      [B,1,T,P,vision_output_dim] (the vision model's last_hidden_state), logits [B,S,V],
      generated_ids [1,8] (i64, greedy continuation of row 0),
      candidates [K, 3] (i64, -1 padded) and candidate_logprobs [K]: the log-likelihood of each
      candidate continuation of row 0 (how classes are scored)

And the image processor (MllamaImageProcessor, the published preprocessing: bilinear antialiased
resize onto the best tile canvas, zero padding, CLIP mean/std, up to 4 tiles; tiles of 28 px here
to keep the fixture small) on real images — the lossless copy of a WBC image from
../shared/data (shared/fixtures/reference/EO_100884.png) and two crops of it, one wide and
one small enough to be upscaled — in shared/fixtures/mllama/processor/: the crops as PNG and
io.safetensors with <name>.pixel_values [1,1,4,3,28,28], <name>.aspect_ratio_ids [1,1],
<name>.aspect_ratio_mask [1,1,4].
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import MllamaConfig, MllamaForConditionalGeneration

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "shared" / "tests" / "fixtures" / "mllama"

CONFIGS = {
    # GQA (4 heads, 2 kv), llama3 rope scaling, two cross-attention layers, f32, one file.
    "gqa-llama3": dict(
        vision=dict(
            hidden_size=16,
            attention_heads=2,
            intermediate_size=32,
            num_hidden_layers=3,
            num_global_layers=1,
            intermediate_layers_indices=[0, 2],
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
        ),
        text=dict(
            vocab_size=120,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
            num_hidden_layers=4,
            cross_attention_layers=[1, 3],
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
        ),
        dtype=torch.float32,
        shard=None,
        # Written as the published checkpoints have it (transformers 4: `rope_scaling` and
        # `rope_theta`); the other configuration keeps transformers 5's `rope_parameters`.
        legacy_rope=True,
    ),
    # No GQA, default rope, one cross-attention layer, two global layers, bf16, sharded.
    "mha-bf16-sharded": dict(
        vision=dict(
            hidden_size=24,
            attention_heads=3,
            intermediate_size=40,
            num_hidden_layers=2,
            num_global_layers=2,
            intermediate_layers_indices=[1],
            image_size=42,
            patch_size=14,
            max_num_tiles=4,
        ),
        text=dict(
            vocab_size=100,
            hidden_size=24,
            num_attention_heads=3,
            num_key_value_heads=3,
            intermediate_size=40,
            num_hidden_layers=3,
            cross_attention_layers=[2],
            rope_parameters=dict(rope_type="default", rope_theta=500000.0),
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
        ),
        dtype=torch.bfloat16,
        shard="60KB",
        legacy_rope=False,
    ),
}


def build(name, spec):
    v = dict(spec["vision"])
    v["vision_output_dim"] = v["hidden_size"] * (1 + len(v["intermediate_layers_indices"]))
    t = dict(spec["text"])
    vocab = t["vocab_size"]
    t.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg = MllamaConfig(vision_config=v, text_config=t, image_token_index=vocab)
    torch.manual_seed(sum(map(ord, name)))
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Open every gate (transformers starts them at zero).
        for pname, p in model.named_parameters():
            if "gate" in pname:
                p.copy_(torch.rand_like(p) * 1.2 + 0.3)
        if spec["dtype"] == torch.bfloat16:
            # Round the weights to bf16 so that the f32 reference uses exactly the stored values.
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return cfg, model


def inputs(cfg):
    v, t = cfg.vision_config, cfg.text_config
    tiles = v.max_num_tiles
    size = v.image_size
    image = cfg.image_token_index
    g = torch.Generator().manual_seed(7)
    seq = 11
    # Row 0: two text tokens before the image token (they see no image), then text.
    # Row 1: the image first, a 2x2 tile image (aspect ratio [2, 2]).
    ids = torch.randint(3, t.vocab_size, (2, seq), generator=g)
    ids[0, 0] = 1
    ids[0, 3] = image
    ids[1, 0] = 1
    ids[1, 1] = image
    pixel = torch.randn(2, 1, tiles, 3, size, size, generator=g)
    ratios = [list(r) for r in v.supported_aspect_ratios]
    ar_ids = torch.tensor([[ratios.index([1, 1]) + 1], [ratios.index([2, 2]) + 1]])
    ar_mask = torch.zeros(2, 1, tiles, dtype=torch.long)
    ar_mask[0, 0, :1] = 1
    ar_mask[1, 0, :4] = 1
    pixel[0, 0, 1:] = 0  # padding tiles are zeros, as the image processor pads them
    xmask = torch.zeros(2, seq, 1, tiles, dtype=torch.long)
    xmask[0, 3:, 0, :1] = 1
    xmask[1, 1:, 0, :4] = 1
    return dict(
        input_ids=ids,
        pixel_values=pixel,
        aspect_ratio_ids=ar_ids,
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=xmask,
    )


CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# The Llama 3.2 Vision Instruct chat format for conversations with images (the published template
# adds a system block with dates only when no image is present): every message is
# <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, images as <|image|>.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|image|>": 128256,
}


def chat_reference():
    """A small byte-level BPE tokenizer.json that carries Llama 3's real special tokens and ids,
    the chat template's token ids, and the cross-attention masks built from image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    d = OUT / "chat"
    d.mkdir(exist_ok=True)
    corpus = [
        "Eosinophil: a white cell with a bilobed nucleus and large orange-red granules.",
        "Neutrophil: segmented nucleus, fine pink granules.",
        "Lymphocyte Monocyte Basophil Blast",
        "What type of white blood cell is this? Describe it.",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    spec = json.loads(tok.to_str())
    for k, v in SPECIAL_TOKENS.items():
        spec["model"]["vocab"][k] = v
    spec["added_tokens"] = [
        dict(id=v, content=k, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        for k, v in SPECIAL_TOKENS.items()
    ]
    (d / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    question = "What type of white blood cell is this? Describe it."
    cases = [
        dict(
            name="question",
            messages=[dict(role="user", content=[dict(type="image"), dict(type="text", text=question)])],
            add_generation_prompt=True,
            num_tiles=[4],
        ),
        dict(
            name="answer",
            messages=[
                dict(role="user", content=[dict(type="image"), dict(type="text", text=question)]),
                dict(role="assistant", content="Eosinophil: a white cell with a bilobed nucleus."),
            ],
            add_generation_prompt=False,
            num_tiles=[1],
        ),
        dict(
            name="two-images",
            messages=[
                dict(
                    role="user",
                    content=[
                        dict(type="image"),
                        dict(type="image"),
                        dict(type="text", text="Compare. "),
                        dict(type="image"),
                        dict(type="text", text="Blast?"),
                    ],
                )
            ],
            add_generation_prompt=True,
            num_tiles=[2, 1, 3],
        ),
    ]
    for c in cases:
        text = fast.apply_chat_template(
            c["messages"], chat_template=CHAT_TEMPLATE, add_generation_prompt=c["add_generation_prompt"], tokenize=False
        )
        ids = fast(text, add_special_tokens=False)["input_ids"]
        sparse = get_cross_attention_token_mask(ids, SPECIAL_TOKENS["<|image|>"])
        dense = convert_sparse_cross_attention_mask_to_dense([sparse], [c["num_tiles"]], 4, len(ids))
        c["text"] = text
        c["ids"] = ids
        c["cross_attention_mask"] = dense[0].tolist()
    (d / "cases.json").write_text(json.dumps(dict(template=CHAT_TEMPLATE, cases=cases)) + "\n")
    print(f"chat: {[len(c['ids']) for c in cases]} tokens")


def processor_reference():
    from PIL import Image
    from transformers import MllamaImageProcessor

    d = OUT / "processor"
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    proc = MllamaImageProcessor(
        size={"height": 28, "width": 28}, max_image_tiles=4, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    cell = Image.open(ROOT / "shared" / "tests" / "fixtures" / "reference" / "EO_100884.png").convert("RGB")
    images = {
        "cell": None,  # the committed PNG itself
        "wide": cell.crop((20, 130, 340, 230)),
        "small": cell.crop((150, 150, 180, 195)),
    }
    out = {}
    for name, img in images.items():
        if img is None:
            img = cell
        else:
            img.save(d / f"{name}.png")
        x = proc(images=[[img]], return_tensors="pt")
        out[f"{name}.pixel_values"] = x["pixel_values"].float().contiguous()
        out[f"{name}.aspect_ratio_ids"] = x["aspect_ratio_ids"].contiguous()
        out[f"{name}.aspect_ratio_mask"] = x["aspect_ratio_mask"].contiguous()
        print(f"processor {name}: {img.size} -> ids {x['aspect_ratio_ids'].tolist()}")
    save_file(out, str(d / "io.safetensors"))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    processor_reference()
    chat_reference()
    for name, spec in CONFIGS.items():
        d = OUT / name
        d.mkdir(exist_ok=True)
        for f in d.iterdir():
            f.unlink()
        cfg, model = build(name, spec)
        x = inputs(cfg)
        with torch.no_grad():
            vision = model.model.vision_model(
                pixel_values=x["pixel_values"],
                aspect_ratio_ids=x["aspect_ratio_ids"],
                aspect_ratio_mask=x["aspect_ratio_mask"],
            ).last_hidden_state
            logits = model(**x).logits.float()
            row0 = {k: v[:1] for k, v in x.items()}
            gen = model.generate(**row0, max_new_tokens=8, do_sample=False, eos_token_id=None)
            # Class scoring: the log-likelihood of each candidate continuation of row 0; the
            # cross-attention mask is extended with the prompt's last row, as generate does.
            candidates = [[5, 6], [7], [8, 9, 10], [5]]
            logprobs = []
            for cand in candidates:
                ids = torch.cat([row0["input_ids"], torch.tensor([cand])], dim=1)
                xm = row0["cross_attention_mask"]
                xm = torch.cat([xm, xm[:, -1:].repeat(1, len(cand), 1, 1)], dim=1)
                out = model(**{**row0, "input_ids": ids, "cross_attention_mask": xm}).logits.float()
                lp = torch.log_softmax(out[0], dim=-1)
                n = row0["input_ids"].shape[1]
                logprobs.append(sum(lp[n - 1 + k, t].item() for k, t in enumerate(cand)))
        generated = gen[:, x["input_ids"].shape[1] :]
        save_kw = dict(safe_serialization=True)
        if spec["shard"]:
            save_kw["max_shard_size"] = spec["shard"]
        model.to(spec["dtype"]).save_pretrained(d, **save_kw)
        (d / "generation_config.json").unlink(missing_ok=True)
        if spec["legacy_rope"]:
            c = json.loads((d / "config.json").read_text())
            rope = c["text_config"].pop("rope_parameters")
            c["text_config"]["rope_theta"] = rope.pop("rope_theta")
            c["text_config"]["rope_scaling"] = rope
            (d / "config.json").write_text(json.dumps(c, indent=2) + "\n")
        io = {k: v.contiguous() for k, v in x.items()}
        io["pixel_values"] = io["pixel_values"].float()
        io["vision_output"] = vision.float().contiguous()
        io["logits"] = logits.contiguous()
        io["generated_ids"] = generated.contiguous()
        io["candidates"] = torch.tensor([c + [-1] * (3 - len(c)) for c in candidates])
        io["candidate_logprobs"] = torch.tensor(logprobs, dtype=torch.float32)
        save_file(io, str(d / "io.safetensors"))
        files = sorted(p.name for p in d.iterdir())
        size = sum(p.stat().st_size for p in d.iterdir())
        print(f"{name}: {files} ({size} bytes); logits max |x| {logits.abs().max():.4f}")


if __name__ == "__main__":
    main()
