"""Train a small NFormer on a Market-1501-layout data set, on a CPU, in the original's recipe.

    python tools/train_small.py DATA_DIR --out export/data/nformer_synthetic.pth [--seed 0]

Stage 1 trains the encoder (ResNet, projection, BNNeck) with an identity loss (label smoothing)
on the BNNeck feature and a batch-hard triplet loss on the feature before it, with P x K identity
sampling, flips, pad-and-crop and random erasing.  Stage 2 freezes the encoder, extracts
(augmented) training features, and trains the refinement on sets drawn like the original's
``NFormerDataset`` (the nearest neighbours of a random centre, subsampled) with landmarks drawn
anew for every layer of every step (the original's ``random.sample``), again with identity +
triplet losses.  The checkpoint is saved in the original's key layout (training heads included),
so ``python -m export.to_onnx`` reads it like one from the original code.

The default configuration is small enough to train in about 10 minutes on 2 CPU cores and to
ship in the repository (< 10 MB): resnet18 with stage widths 16/32/64/128, 128-d embeddings,
4 refinement layers, 2 heads, k = 20, 5 landmarks, 128x64 crops.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.contract.config import ModelConfig  # noqa: E402
from export.contract.landmarks import sample_landmarks  # noqa: E402
from export.reference.model import NFormerModel  # noqa: E402
from export.reference.reciprocal_neighbors import reciprocal_neighbors  # noqa: E402
from export.contract.market1501 import read_market1501  # noqa: E402
from runtime.evaluation.metrics import euclidean_distances, evaluate_rank  # noqa: E402
from export.contract.preprocess import preprocess  # noqa: E402

SMALL = ModelConfig(arch="resnet18", widths=(16, 32, 64, 128), stem_width=16, feature_dim=128, n_embd=128,
                    n_layer=4, n_head=2, topk=20, landmarks=5, input_size_hw=(128, 64))


def load_split(items, size_hw):
    return torch.from_numpy(np.stack([preprocess(i.path, size_hw) for i in items]))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 8, erase_p: float = 0.5) -> torch.Tensor:
    """Flip, pad-and-crop and random erasing (the original's training transforms) on a batch."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    for i in range(b):
        out[i] = padded[i, :, offs[i, 0]:offs[i, 0] + h, offs[i, 1]:offs[i, 1] + w]
    for i in range(b):
        if torch.rand(1, generator=gen).item() < erase_p:
            eh = int(h * torch.empty(1).uniform_(0.2, 0.5, generator=gen))
            ew = int(w * torch.empty(1).uniform_(0.2, 0.5, generator=gen))
            y0 = torch.randint(0, h - eh + 1, (1,), generator=gen).item()
            x0 = torch.randint(0, w - ew + 1, (1,), generator=gen).item()
            out[i, :, y0:y0 + eh, x0:x0 + ew] = torch.randn(3, eh, ew, generator=gen)
    return out


def triplet_hard(feat: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    d = torch.cdist(feat, feat)
    same = labels[:, None] == labels[None, :]
    hardest_pos = (d * same).max(1).values
    hardest_neg = (d + 1e6 * same).min(1).values
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def pk_batches(labels: np.ndarray, p: int, k: int, rng: random.Random):
    by_id = {}
    for i, l in enumerate(labels):
        by_id.setdefault(int(l), []).append(i)
    ids = list(by_id)
    rng.shuffle(ids)
    for s in range(0, len(ids) - p + 1, p):
        batch = []
        for pid in ids[s:s + p]:
            pool = by_id[pid]
            batch += rng.sample(pool, k) if len(pool) >= k else [rng.choice(pool) for _ in range(k)]
        yield batch


def encoder_features(enc, images, batch=256, gen=None):
    enc.eval()
    with torch.no_grad():
        return torch.cat([enc(augment(images[s:s + batch], gen, erase_p=0.0) if gen else images[s:s + batch])
                          for s in range(0, len(images), batch)])


def evaluate(model, query, gallery, q_items, g_items, seed=0):
    """Encoder-only and refined mAP / Rank-1 with the original protocol (query and gallery refined together)."""
    with torch.no_grad():
        model.eval()
        feats = F.normalize(torch.cat([encoder_features(model.backbone, query),
                                       encoder_features(model.backbone, gallery)]), dim=1)
        n = len(feats)
        lm = torch.from_numpy(sample_landmarks(n, model.config.n_layer, model.config.landmarks, seed))
        refined = F.normalize(model.nformer(feats[None], lm)[0], dim=1)
    q_pids = np.array([i.pid for i in q_items]); g_pids = np.array([i.pid for i in g_items])
    q_cams = np.array([i.camid for i in q_items]); g_cams = np.array([i.camid for i in g_items])
    out = {}
    for stage, f in (("encoder", feats), ("refined", refined)):
        f = f.numpy()
        cmc, mAP = evaluate_rank(euclidean_distances(f[:len(q_items)], f[len(q_items):]), q_pids, g_pids, q_cams, g_cams)
        out[stage] = {"mAP": mAP, "rank1": float(cmc[0])}
    return out


def write_card(checkpoint: Path, argv: list[str], seed: int, data: Path, identities: int | None, result: dict,
               seconds: float) -> Path:
    """The model card beside the checkpoint: how it was made, how to export it, what it scored."""
    import hashlib

    from export.reference.checkpoint import load_checkpoint

    config = load_checkpoint(checkpoint).config
    card = {
        "what": "A small NFormer trained on synthetic Market-1501-layout data by tools/train_small.py, "
                "for the demo and the tests. Not a person re-identification model for real cameras.",
        "command": "python tools/train_small.py " + " ".join(argv),
        "data": ({"made_by": f"runtime synth DIR --identities {identities} --seed 0", "identities": identities, "seed": 0}
                 if identities else {"made_by": str(data)}),
        "seed": seed,
        "config": {**config.to_json(), "input_size_hw": list(SMALL.input_size_hw)},
        "export_options": {"input_size_hw": list(SMALL.input_size_hw), "n_head": SMALL.n_head, "topk": SMALL.topk,
                           "landmarks": SMALL.landmarks, "last_stride": SMALL.last_stride},
        "test_split_during_training": result,
        "training_seconds": round(seconds),
        "bytes": checkpoint.stat().st_size,
        "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
    }
    path = checkpoint.with_suffix(".json")
    path.write_text(json.dumps(card, indent=1) + "\n")
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder-epochs", type=int, default=120)
    parser.add_argument("--nformer-steps", type=int, default=1000)
    parser.add_argument("--set-size", type=int, default=400, help="Rows per refinement training set.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    data = read_market1501(args.data)
    pid_map = {p: i for i, p in enumerate(sorted({i.pid for i in data.train}))}
    labels = np.array([pid_map[i.pid] for i in data.train])
    config = ModelConfig(**{**SMALL.__dict__, "num_classes": len(pid_map)})
    size = config.input_size_hw
    train_x = load_split(data.train, size)
    query_x, gallery_x = load_split(data.query, size), load_split(data.gallery, size)
    print(f"data: {len(train_x)} training crops of {len(pid_map)} identities, {len(query_x)} queries, "
          f"{len(gallery_x)} gallery ({time.time() - t0:.0f}s)", flush=True)

    model = NFormerModel(config)
    enc = model.backbone
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for nf_param in model.nformer.parameters():  # the original's Conv1D init
        if nf_param.dim() == 2:
            nn.init.normal_(nf_param, std=0.02)
    enc.bottleneck.bias.requires_grad_(False)   # BNNeck: no shift, as the original
    model.nformer.bottleneck.bias.requires_grad_(False)
    enc_cls = nn.Linear(config.feature_dim, len(pid_map), bias=False)
    nf_cls = nn.Linear(config.n_embd, len(pid_map), bias=False)
    nn.init.normal_(enc_cls.weight, std=0.001)
    nn.init.normal_(nf_cls.weight, std=0.001)

    # ---- stage 1: the encoder ----
    params = [p for p in list(enc.parameters()) + list(enc_cls.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=5e-4)
    batches_per_epoch = len(pid_map) // 16
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.encoder_epochs * batches_per_epoch,
                                                pct_start=0.1)
    for epoch in range(args.encoder_epochs):
        enc.train()
        losses = []
        for batch in pk_batches(labels, 16, 4, rng):
            x = augment(train_x[batch], gen)
            y = torch.from_numpy(labels[batch])
            g = enc.projection(enc.gap(enc.base(x)).flatten(1))
            score = enc_cls(enc.bottleneck(g))
            loss = F.cross_entropy(score, y, label_smoothing=0.1) + triplet_hard(g, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if epoch % 10 == 9 or epoch == args.encoder_epochs - 1:
            m = evaluate(model, query_x, gallery_x, data.query, data.gallery)["encoder"]
            print(f"encoder epoch {epoch + 1}: loss {np.mean(losses):.3f}, test mAP {m['mAP']:.3f} "
                  f"rank-1 {m['rank1']:.3f} ({time.time() - t0:.0f}s)", flush=True)
        else:
            print(f"encoder epoch {epoch + 1}: loss {np.mean(losses):.3f} ({time.time() - t0:.0f}s)", flush=True)

    # ---- stage 2: the refinement on frozen encoder features ----
    for p in enc.parameters():
        p.requires_grad_(False)
    feats = torch.cat([encoder_features(enc, train_x, gen=gen) for _ in range(3)])
    feats = F.normalize(feats, dim=1)
    feat_labels = torch.from_numpy(np.tile(labels, 3))
    nf = model.nformer
    params = [p for p in list(nf.parameters()) + list(nf_cls.parameters()) if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-4, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=args.nformer_steps, pct_start=0.1)
    nf.train()
    total = len(feats)
    for step in range(args.nformer_steps):
        # NFormerDataset: nearest int(L * (1 + u)) rows of a random centre, subsampled to L, shuffled
        centre = rng.randrange(total)
        order = torch.argsort(1 - feats @ feats[centre])
        pool = order[: min(total, int(args.set_size * (1 + rng.random())))].tolist()
        chosen = rng.sample(pool, min(args.set_size, len(pool)))
        x = feats[chosen][None]
        y = feat_labels[chosen]
        idx, valid = reciprocal_neighbors(x, config.topk)
        lm = torch.tensor([rng.sample(range(x.shape[1]), config.landmarks) for _ in range(config.n_layer)])
        h = x
        for i, block in enumerate(nf.h):
            h = block(h, lm[i], idx, valid)
        h = h[0]
        score = nf_cls(nf.bottleneck(h))
        loss = F.cross_entropy(score, y, label_smoothing=0.1) + triplet_hard(h, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 49 or step == args.nformer_steps - 1:
            m = evaluate(model, query_x, gallery_x, data.query, data.gallery)
            nf.train()
            print(f"nformer step {step + 1}: loss {loss.item():.3f}, test mAP encoder {m['encoder']['mAP']:.3f} "
                  f"refined {m['refined']['mAP']:.3f} ({time.time() - t0:.0f}s)", flush=True)

    model.eval()
    state = dict(model.state_dict())
    state["backbone.classifier.weight"] = enc_cls.weight.detach().clone()
    state["nformer.classifier.weight"] = nf_cls.weight.detach().clone()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    result = evaluate(model, query_x, gallery_x, data.query, data.gallery)
    identities = len({i.pid for i in data.train}) * 2
    card = write_card(args.out, sys.argv[1:], args.seed, args.data, identities, result, time.time() - t0)
    print(json.dumps({"checkpoint": str(args.out), "card": str(card), "bytes": args.out.stat().st_size,
                      "seconds": time.time() - t0, "test": result}, indent=1))


if __name__ == "__main__":
    main()
