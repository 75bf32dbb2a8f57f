"""The peer side of the side-by-side benchmarks: PyTorch eager (torchvision MobileNetV2; and
ONNX Runtime on the same model exported to ONNX) and transformers
(MllamaForConditionalGeneration), on the same weights, shapes and protocol as
appliance/benches/peers.rs. Run through bench/run.sh, which installs the pinned versions.

    python bench/peers.py compact --weights mobilenet_v2-b0353104.pth --side 224 --attribute-width 30 [--onnx]
    python bench/peers.py make-mllama --scale large --out DIR     # random weights for both sides
    python bench/peers.py mllama --dir DIR [--tokens 16]
    python bench/peers.py mllama-shape --scale 11b --device cuda --dtype bfloat16   # random weights
    python bench/peers.py qlora-step --scale 11b --device cuda --dtype bfloat16     # PEFT LoRA
    python bench/peers.py bandwidth --device cuda

Prints one JSON object per measurement. Protocol: warm up twice, then the median of `reps`
timed runs; memory is the peak resident set during the timed runs above the resident set before
them (the kernel's high-water mark is reset first), and the resident set with the model loaded.
"""

import argparse
import json
import os
import statistics
import time

import torch

torch.set_num_threads(os.cpu_count())


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(reps, f):
    """Median ms of `reps` runs after two warm-ups; working and resting memory (MiB): the
    process's resident set on the CPU, the CUDA allocator's on a GPU."""
    f()
    f()
    sync()
    cuda = torch.cuda.is_available()
    if cuda:
        rest = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        rest = status_mib("VmRSS:")
        with open("/proc/self/clear_refs", "w") as c:
            c.write("5")
    ms = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        sync()
        ms.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else status_mib("VmHWM:")
    return statistics.median(ms), peak - rest, rest


def compact(args):
    import torchvision

    backbone = torchvision.models.mobilenet_v2()
    backbone.load_state_dict(torch.load(args.weights, map_location="cpu"))
    torch.manual_seed(0)

    class Model(torch.nn.Module):
        """MobileNetV2's features, average pooling, and the class and attribute heads."""

        def __init__(self):
            super().__init__()
            self.features = backbone.features
            self.classes = torch.nn.Linear(1280, 6)
            self.attributes = torch.nn.Linear(1280, args.attribute_width)

        def forward(self, x):
            f = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
            return self.classes(f).softmax(-1), self.attributes(f), f

    model = Model().eval().to(args.device)
    for batch, reps in BATCHES:
        x = torch.randn(batch, 3, args.side, args.side, device=args.device)

        def run():
            with torch.inference_mode():
                out = model(x)
                # As our side does: the results to host vectors.
                [o.cpu().numpy() for o in out]

        report(f"compact/batch{batch}", batch, *measure(reps, run))
    if args.onnx:
        onnx_runtime(model, args.side)


# (batch, timed runs): the same on every side.
BATCHES = [(1, 21), (64, 5)]


def report(bench, batch, ms, working, rest):
    print(json.dumps({
        "bench": bench, "ms": ms, "ms_per_cell": ms / batch,
        "cells_per_s": batch * 1e3 / ms, "working_mib": working, "rest_mib": rest,
    }), flush=True)


def onnx_runtime(model, side):
    """The same model exported to ONNX and run by ONNX Runtime on the CPU (all cores), the
    runtime a maintainer might pick for a CNN on an appliance. Its memory figures include the
    PyTorch model still held by this process, so only its times are compared."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    model = model.cpu()
    path = os.path.join(tempfile.mkdtemp(), "compact.onnx")
    x = torch.randn(1, 3, side, side)
    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["classes", "attributes", "features"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = model(x)[0].numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4, "ONNX Runtime disagrees with PyTorch"
    print(json.dumps({"bench": "compact-ort/runtime", "onnxruntime": ort.__version__}), flush=True)
    for batch, reps in BATCHES:
        xb = np.random.default_rng(0).standard_normal((batch, 3, side, side), dtype=np.float32)
        report(f"compact-ort/batch{batch}", batch, *measure(reps, lambda: session.run(None, {"x": xb})))


SCALES = {
    # vision hidden, layers; text hidden, layers; vocabulary (224-px tiles, 2 global layers)
    "small": (128, 4, 256, 4, 8_000),
    "medium": (512, 8, 1024, 8, 32_000),
    "large": (1024, 16, 2048, 16, 64_000),
}


def config(scale):
    """The shapes of MllamaConfig::bench_scale: `11b` is the published configuration."""
    from transformers import MllamaConfig

    if scale == "11b":
        v = dict(hidden_size=1280, attention_heads=16, intermediate_size=5120, num_hidden_layers=32,
                 num_global_layers=8, intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680,
                 image_size=560, patch_size=14, max_num_tiles=4)
        t = dict(vocab_size=128256, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, num_hidden_layers=40, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                 rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                      high_freq_factor=4.0, original_max_position_embeddings=8192),
                 max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, pad_token_id=128004)
        return MllamaConfig(vision_config=v, text_config=t, image_token_index=128256)
    vd, vl, td, tl, vocab = SCALES[scale]
    v = dict(hidden_size=vd, attention_heads=vd // 64, intermediate_size=vd * 4, num_hidden_layers=vl,
             num_global_layers=2, intermediate_layers_indices=[1, vl - 1], vision_output_dim=vd * 3,
             image_size=224, patch_size=14, max_num_tiles=4)
    t = dict(vocab_size=vocab, hidden_size=td, num_attention_heads=td // 64, num_key_value_heads=td // 256,
             intermediate_size=td * 4, num_hidden_layers=tl, cross_attention_layers=[1, tl - 1],
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192),
             max_position_embeddings=131072, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    return MllamaConfig(vision_config=v, text_config=t, image_token_index=vocab)


def random_model(cfg, device="cpu", dtype=torch.float32):
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = MllamaForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.rand_like(p) * 1.2 + 0.3)
    return model


def make_mllama(args):
    model = random_model(config(args.scale))
    model.save_pretrained(args.out, safe_serialization=True)
    print(json.dumps({"made": args.out, "parameters": sum(p.numel() for p in model.parameters())}))


def mllama_inputs(cfg, s=24):
    t = cfg.vision_config.image_size
    ids = torch.arange(10, 10 + s).unsqueeze(0)
    ids[0, 0], ids[0, 1] = 1, cfg.image_token_index
    mask = torch.zeros(1, s, 1, 4, dtype=torch.long)
    mask[0, 1:, 0, 0] = 1
    pixels = torch.zeros(1, 1, 4, 3, t, t)
    pixels[0, 0, 0] = torch.randn(3, t, t)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.tensor([[[1, 0, 0, 0]]]),
                cross_attention_mask=mask)


def mllama(args):
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(args.dir, dtype=torch.float32).eval()
    prefill_and_decode(model, args.tokens, "cpu", scoring=False)


def mllama_shape(args):
    """Random weights at a shape, on a device and dtype (bf16 on a GPU, as transformers users run it)."""
    dtype = getattr(torch, args.dtype)
    model = random_model(config(args.scale), args.device, dtype)
    print(json.dumps({"bench": "mllama-shape/model", "scale": args.scale, "dtype": args.dtype,
                      "parameters": sum(p.numel() for p in model.parameters())}), flush=True)
    prefill_and_decode(model, args.tokens, args.device, scoring=True)


def prefill_and_decode(model, tokens, device, scoring):
    x = {k: v.to(device) for k, v in mllama_inputs(model.config).items()}
    x["pixel_values"] = x["pixel_values"].to(model.dtype)

    def run(n):
        with torch.inference_mode():
            model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None)

    prefill, working, rest = measure(3, lambda: run(1))
    total, working_total, _ = measure(3, lambda: run(1 + tokens))
    print(json.dumps({"bench": "mllama/prefill", "ms": prefill, "working_mib": working, "rest_mib": rest}), flush=True)
    print(json.dumps({
        "bench": "mllama/decode", "new_tokens": tokens, "ms_per_token": (total - prefill) / tokens,
        "tokens_per_s": tokens * 1e3 / (total - prefill), "working_mib": working_total, "rest_mib": rest,
    }), flush=True)
    if scoring:
        # A cell's six class scores, as transformers users would: one forward pass per candidate
        # continuation (prompt + candidate), the log-likelihood of its tokens.
        candidates = [[100, 101], [102], [103, 104], [105], [106, 107], [108]]

        def score():
            with torch.inference_mode():
                for c in candidates:
                    ids = torch.cat([x["input_ids"], torch.tensor([c], device=device)], dim=1)
                    xm = x["cross_attention_mask"]
                    xm = torch.cat([xm, xm[:, -1:].repeat(1, len(c), 1, 1)], dim=1)
                    model(**{**x, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                             "cross_attention_mask": xm}).logits[0, -len(c) - 1:].log_softmax(-1)

        ms, working, _ = measure(3, score)
        print(json.dumps({"bench": "mllama/class-scores", "ms": ms, "working_mib": working}), flush=True)


def qlora_step(args):
    """transformers + PEFT: LoRA (rank 16, alpha 32, text attention and MLP) on the frozen base,
    one 560-px image (1 tile) and an 88-token conversation whose last 64 tokens are the answer."""
    from peft import LoraConfig, get_peft_model

    base = random_model(config(args.scale), args.device, getattr(torch, args.dtype))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    model = get_peft_model(base, lora)
    model.train()
    s = 88
    x = mllama_inputs(base.config, s)
    x = {k: v.to(args.device) for k, v in x.items()}
    x["pixel_values"] = x["pixel_values"].to(base.dtype)
    labels = x["input_ids"].clone()
    labels[:, : s - 64] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = model(**x, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms, working, rest = measure(3, step)
    print(json.dumps({"bench": "mllama/qlora-step", "ms": ms, "samples_per_s": 1e3 / ms,
                      "working_mib": working, "rest_mib": rest, "peak_mib": working + rest}), flush=True)


def bandwidth(args):
    """Device memory copy bandwidth (GB/s): read + write of a 2 GiB buffer."""
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device=args.device)
    b = torch.empty_like(a)
    ms, _, _ = measure(10, lambda: b.copy_(a))
    print(json.dumps({"bench": "device/bandwidth", "gb_per_s": 2 * n / ms / 1e6}), flush=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compact")
    c.add_argument("--weights", required=True)
    c.add_argument("--side", type=int, required=True)
    c.add_argument("--attribute-width", type=int, required=True)
    c.add_argument("--device", default="cpu")
    c.add_argument("--onnx", action="store_true", help="also ONNX Runtime on the same model (CPU)")
    m = sub.add_parser("make-mllama")
    m.add_argument("--scale", choices=SCALES, default="large")
    m.add_argument("--out", required=True)
    g = sub.add_parser("mllama")
    g.add_argument("--dir", required=True)
    g.add_argument("--tokens", type=int, default=16)
    for name in ["mllama-shape", "qlora-step"]:
        h = sub.add_parser(name)
        h.add_argument("--scale", choices=[*SCALES, "11b"], default="small")
        h.add_argument("--device", default="cpu")
        h.add_argument("--dtype", default="float32")
        h.add_argument("--tokens", type=int, default=16)
    b = sub.add_parser("bandwidth")
    b.add_argument("--device", default="cuda")
    args = ap.parse_args()
    {"compact": compact, "make-mllama": make_mllama, "mllama": mllama, "mllama-shape": mllama_shape,
     "qlora-step": qlora_step, "bandwidth": bandwidth}[args.cmd](args)


if __name__ == "__main__":
    main()
