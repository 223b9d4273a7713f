"""Retrain MuLan's text tower against a locked audio tower (LiT, Zhai et al. 2022).

    python -m audio_tokenizers.mulan train --config configs/mulan.yaml lock_audio=pretrained/mulan steps=2000 ...

The audio tower and the conditioning RVQ of `lock_audio` are kept as they are, so every audio token the
project has cached (and every stage trained on them) stays valid; only the text tower (and the temperature)
trains, on captions in wider words (data.captions.describe), to land where the locked audio tower puts the
clip. With the audio side fixed, its embeddings are computed once (a bank of crops per training clip, saved
beside the run), and a step is a text forward and backward only: a large batch costs little.

The checkpoint records `locked_audio_hash`, the hashes of the MuLans whose audio tokens it makes (the locked one's
and, when that one was itself a LiT run, those it recorded; data.tokenize.mulan_audio_hashes reads them), so
caches and stages made with any of them accept this one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from audio_tokenizers.mulan import MuLan, MuLanConfig, captioned_rows, retrieval
from common.checkpoint import load_checkpoint, load_weights, save_checkpoint
from common.config import config_from_dict, config_to_dict
from common.errors import UserError
from common.training import step_generator
from data import captions as cap
from data.audio import crop_or_pad
from data.manifest import SkipCounter, iter_audio, read_manifest, read_prompts

# fields that must match the locked MuLan: they shape its weights or its tokens
SHAPE_FIELDS = ("sample_rate", "embed_dim", "n_mels", "audio_dim", "audio_layers", "audio_heads", "crop_seconds",
                "vocab_size", "text_dim", "text_layers", "text_heads", "max_text_tokens", "text_pretrained_path",
                "rvq_levels", "rvq_codebook_size")


def lit_caption(row: dict, rng: np.random.Generator, filler: list[str] | tuple = (), p_filler: float = 0.0) -> str:
    """A caption in the wider words of data.captions.describe (corpus clips), else the clip's caption; with
    probability p_filler salted with words of `filler` (data.captions.add_filler)."""
    text = cap.describe(row, rng) if cap.has_metadata(row) else row["caption"]
    return cap.add_filler(text, filler, rng, p_filler)


def load_locked(cfg: MuLanConfig) -> tuple[MuLan, str]:
    """The MuLan named by lock_audio, checked to have this config's shapes -> (model, the hashes of every MuLan
    that makes its audio tokens, comma-separated)."""
    from data.tokenize import mulan_audio_hashes
    path = Path(cfg.lock_audio)
    if not (path / "config.json").is_file():
        raise UserError(f"lock_audio={path}: no MuLan checkpoint there; pass a trained one (e.g. pretrained/mulan)")
    ck = load_checkpoint(path, kind="mulan")
    theirs = config_from_dict(MuLanConfig, ck.config, str(path))
    differ = [f for f in SHAPE_FIELDS if getattr(theirs, f) != getattr(cfg, f)]
    if differ:
        raise UserError(f"lock_audio={path} has other {', '.join(differ)} than this config; set them as in "
                        f"{path}/config.json or drop lock_audio")
    proto = bytes(ck.state_dict["spm_proto"].numpy().tobytes())
    model = MuLan(cfg, None if cfg.text_pretrained_path else proto)
    load_weights(model, ck.state_dict, path)
    return model, ",".join(sorted(mulan_audio_hashes(path)))   # locking a locked MuLan: its own and its lock's


@torch.no_grad()
def audio_bank(model: MuLan, rows: list[dict], crops: int, seed: int) -> torch.Tensor:
    """Locked audio embeddings [N, 1 + crops, D] of each clip: whole, then `crops` random crops."""
    model.eval()
    rng, win, out = np.random.default_rng(seed), int(model.cfg.crop_seconds * model.sample_rate), []
    for _, wav in tqdm(iter_audio(rows, model.sample_rate, SkipCounter()), total=len(rows), desc="audio bank",
                       mininterval=5.0):
        views = [model.embed_audio(torch.from_numpy(wav)[None, None])]
        if crops:
            x = torch.stack([torch.from_numpy(crop_or_pad(wav, win, rng).copy()) for _ in range(crops)])
            views.append(model.audio(x))
        out.append(torch.cat(views))
    if len(out) != len(rows):
        raise UserError(f"{len(rows) - len(out)} training clips could not be read; fix the manifest's audio paths")
    return torch.stack(out)


class LockedAudioTask:
    """The text tower of a MuLan as a task of the one training loop; the audio side is a fixed bank."""
    kind = "mulan"

    def __init__(self, cfg: MuLanConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.rows = captioned_rows(cfg.train_manifest)
        self.model, cfg.locked_audio_hash = load_locked(cfg)
        self.dev = DevPrompts(cfg.dev_prompts, self.rows) if cfg.dev_prompts else None   # checked before the bank
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith("text.") or name == "logit_scale")
        bank_file = Path(cfg.out) / "audio_bank.pt"
        saved = torch.load(bank_file) if bank_file.is_file() else {}
        if saved.get("hash") == cfg.locked_audio_hash and len(saved["bank"]) == len(self.rows):
            self.bank = saved["bank"]
        else:
            self.bank = audio_bank(self.model, self.rows, cfg.rvq_crops_per_clip, cfg.seed)
            bank_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"hash": cfg.locked_audio_hash, "bank": self.bank}, bank_file.with_suffix(".tmp"))
            bank_file.with_suffix(".tmp").replace(bank_file)
        self.valid = read_manifest(cfg.valid_manifest)[: cfg.eval_clips]
        self.filler = cap.filler_words() if cfg.filler_words > 0 else []
        self.step, self.best = 0, -1.0
        if self.dev is not None:
            self.dev.set_centroids(self.bank[:, 0])
            print(f"dev prompts at the start: {self.evaluate_dev(self.model):.3f}", flush=True)
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        print(f"text tower: {trained / 1e6:.2f} M trained parameters; audio locked ({cfg.locked_audio_hash}); "
              f"bank {tuple(self.bank.shape)}", flush=True)

    def loss(self, model, step: int, micro: int, rank: int, world: int):
        if world > 1:
            raise UserError("lock_audio trains on one process (a text-only step is cheap); run it without torchrun")
        cfg, g = self.cfg, step_generator(self.cfg.seed, step, micro)
        self.step = step + 1                         # the step an evaluation after this one reports
        idx = torch.randint(len(self.rows), (cfg.batch_size,), generator=g)
        view = torch.randint(self.bank.shape[1], (cfg.batch_size,), generator=g)
        a = self.bank[idx, view].to(self.model.logit_scale.device)
        texts = [lit_caption(self.rows[int(i)], np.random.default_rng([cfg.seed, step, micro, j]), self.filler,
                             cfg.filler_words) for j, i in enumerate(idx)]
        t = self.model.text(texts)
        scale = self.model.logit_scale.exp().clamp(max=100)
        same = idx[:, None] == idx[None, :]          # a clip drawn twice is not its own negative
        logits = (scale * t @ a.t()).masked_fill(same & ~torch.eye(len(idx), dtype=torch.bool), float("-inf"))
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return loss, {"temperature": float(1 / self.model.logit_scale.exp())}

    def evaluate(self, model) -> dict:
        scores = retrieval(self.model, self.valid)
        if self.dev is not None:
            scores["dev_instrument"] = self.evaluate_dev(model)
        return scores

    def evaluate_dev(self, model) -> float:
        """The dev prompts' score; a new best (the first wins a tie: fewer steps) is saved in out/best."""
        score = self.dev.accuracy(model)
        if score > self.best:
            self.best = score
            save_checkpoint(Path(self.cfg.out) / "best", "mulan", config_to_dict(self.cfg), model.state_dict(),
                            meta={"step": self.step, "dev_instrument": score})
        return score

    def finish(self, model) -> Path:
        out = Path(self.cfg.out) / "model"
        save_checkpoint(out, "mulan", config_to_dict(self.cfg), model.state_dict())
        print(f"saved {out}", flush=True)
        if self.dev is not None:
            print(f"best on the dev prompts: {self.best:.3f} ({Path(self.cfg.out) / 'best'})", flush=True)
        return out


class DevPrompts:
    """Prompts kept apart from training and from the evaluation prompts, to choose a LiT step by: the share of
    them whose text embedding lies nearest the locked audio tower's mean embedding of the named instrument's
    training clips (zero-shot naming against the audio side, which LiT does not move)."""

    def __init__(self, path: str, rows: list[dict]):
        try:
            lines = read_prompts(path)
        except UserError as e:
            raise UserError(f"dev_prompts={path}: {e}") from None
        labels = sorted({r["instrument_label"] for r in rows if r.get("instrument_label")})
        self.texts = [d["caption"] for d in lines]
        unknown = sorted({d.get("instrument_label") for d in lines} - set(labels), key=str)
        if unknown:
            raise UserError(f"dev_prompts={path}: every prompt needs an instrument_label of the training clips "
                            f"(not in training, or missing: {unknown[:5]})")
        self.target = torch.tensor([labels.index(d["instrument_label"]) for d in lines])
        self.members = [[i for i, r in enumerate(rows) if r.get("instrument_label") == lab] for lab in labels]
        self.centroids = torch.empty(0)

    def set_centroids(self, whole: torch.Tensor) -> None:
        """whole: [N, D] locked audio embeddings of the training rows, in their order."""
        self.centroids = F.normalize(torch.stack([whole[m].mean(0) for m in self.members]), dim=-1)

    @torch.no_grad()
    def accuracy(self, model: MuLan) -> float:
        was = model.training
        model.eval()
        t = model.embed_text(self.texts)
        model.train(was)
        return round(float(((t @ self.centroids.t()).argmax(1) == self.target).float().mean()), 4)
