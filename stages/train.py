"""Stage training (`python -m stages.semantic|coarse|fine|delay|masked`) on the one loop of common/training.py.

Each step's batch (rows, window starts, condition-dropout mask, condition source) comes from a
generator seeded by (seed, step), so `--resume` continues exactly and every DDP rank agrees on
the global batch; rank r trains on rows r, r + world, ... of it. Under `torchrun
--nproc_per_node=N` it runs DistributedDataParallel (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common.config import load_config, parse_args_with_overrides
from common.errors import UserError, run_cli
from audio_tokenizers.melody import NONE as NO_MELODY
from common.training import run
from data import attributes, onsets
from data.tokenize import TokenCache
from stages.base import StageConfig, build_stage, save_stage


def check_cache(cfg: StageConfig, cache: TokenCache) -> None:
    """Refuse a cache whose vocabularies, levels or frame rates differ from the stage's."""
    ix, wrong = cache.index, []
    expect = [("mulan codebook", cfg.mulan_codebook, ix["mulan"]["codebook"]),
              ("semantic codebook", cfg.semantic_codebook, ix["semantic"]["codebook"]),
              ("semantic frame rate", cfg.semantic_rate, ix["semantic"]["frame_rate"]),
              ("acoustic codebook", cfg.acoustic_codebook, ix["acoustic"]["codebook"]),
              ("acoustic frame rate", cfg.acoustic_rate, ix["acoustic"]["frame_rate"])]
    wrong = [f"{name} {a} (config) vs {b} (cache)" for name, a, b in expect if abs(float(a) - float(b)) > 1e-6]
    made_by = ix["semantic"].get("fingerprint", "")   # caches from before fingerprints have none
    if cfg.semantic_tokens and made_by and cfg.semantic_tokens != made_by:
        wrong.append(f"semantic tokenizer {cfg.semantic_tokens} (config) vs {made_by} (cache)")
    if cfg.mulan_levels > ix["mulan"]["levels"]:
        wrong.append(f"mulan_levels = {cfg.mulan_levels} but the cache has {ix['mulan']['levels']} levels")
    if cfg.cond_source not in ("audio", "text", "mix"):
        wrong.append(f"cond_source={cfg.cond_source!r} is not audio, text or mix")
    elif cfg.cond_source != "audio" and "mulan_text" not in cache.arrays:
        wrong.append(f"cond_source={cfg.cond_source} needs text tokens (python -m data.tokenize --text-only ...)")
    if cfg.melody_input and "melody" not in cache.arrays:
        wrong.append("melody_input needs melody ids (python -m data.tokenize --melody-only --out CACHE)")
    if cfg.attribute_input and "attributes" not in cache.arrays:
        wrong.append("attribute_input needs each clip's tempo and key (python -m data.tokenize --attributes-only "
                     "--out CACHE --manifest ...)")
    if cfg.onset_input and "onsets" not in cache.arrays:
        wrong.append("onset_input needs each clip's onset levels (python -m data.tokenize --onsets-only --out CACHE)")
    if cfg.coarse_levels + cfg.fine_levels > ix["acoustic"]["levels"]:
        wrong.append(f"coarse_levels + fine_levels = {cfg.coarse_levels + cfg.fine_levels} but the codec has "
                     f"{ix['acoustic']['levels']} levels")
    if wrong:
        raise UserError(f"the cache {cache.root} does not fit this {cfg.kind} config: {'; '.join(wrong)}")


def train_rows(cache: TokenCache, cfg: StageConfig) -> np.ndarray:
    """The cache rows a stage trains on: the train split, or only its first `train_clips` clips (an appended
    cache keeps its old clips first, so the subsets of a data-scaling curve are nested)."""
    rows = cache.rows("train")
    return rows[: cfg.train_clips] if cfg.train_clips else rows


def batch_at(cache: TokenCache, rows: np.ndarray, cfg: StageConfig, step: int, batch: int, rank: int = 0,
             world: int = 1, seed_offset: int = 0, train: bool = True) -> tuple[dict, torch.Tensor]:
    """The global batch of `step` (a function of seed and step only), this rank's share of it. With
    train=False the condition is left as it is (the clip's audio tokens) for the evaluation to choose."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + seed_offset)
    pick = rows[torch.randint(len(rows), (batch,), generator=g).numpy()]
    total = cache.arrays["semantic"].shape[1]
    frames = min(total, int(round(cfg.window_seconds * cfg.semantic_rate)))
    starts = torch.randint(0, total - frames + 1, (batch,), generator=g).numpy()
    drop = torch.rand(batch, generator=g) < cfg.cond_dropout
    ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
    mine = slice(rank, None, world)
    draws = [d[mine] for d in condition_draws(cfg, g, batch)]
    b = cache.window(pick[mine], starts[mine], frames, ratio)
    b["mulan"] = training_condition(b, cfg, *draws[:4]) if train else b["mulan"][:, : cfg.mulan_levels]
    if "melody" in b and train:   # melody dropout: a share of rows learns to do without one
        b["melody"] = torch.where(draws[4][:, None], NO_MELODY, b["melody"])
    if cfg.attribute_input and "attributes" in b:   # tempo and key ids; each hidden at random, as prompts omit them
        b["attrs"] = attributes.ids(b.pop("attributes"))
        if train:
            b["attrs"] = attributes.drop(b["attrs"], draws[5])
        if cfg.beat_input:   # where each window starts in its clip (s): the beat clock counts from the clip's start
            b["beat_start"] = torch.from_numpy(starts[mine]).double() / cfg.semantic_rate
    if "onsets" in b and train:   # onset dropout: a share of rows learns to do without them
        b["onsets"] = torch.where(draws[6][:, None], onsets.NOT_GIVEN, b["onsets"])
    return b, drop[mine]


def condition_draws(cfg: StageConfig, g: torch.Generator, batch: int) -> tuple[torch.Tensor, ...]:
    """Per row of the global batch: text or audio condition, which caption, how many levels kept, whether cut,
    whether the melody, each attribute and the onset levels are hidden."""
    use_text = torch.rand(batch, generator=g) < {"audio": 0.0, "text": 1.0, "mix": cfg.cond_text_prob}.get(cfg.cond_source, 0.0)
    which = torch.randint(0, 1 << 30, (batch,), generator=g)
    keep = torch.randint(1, max(2, cfg.mulan_levels), (batch,), generator=g)
    cut = torch.rand(batch, generator=g) < cfg.cond_level_dropout
    no_melody = torch.rand(batch, generator=g) < cfg.melody_dropout
    no_attribute = torch.rand(batch, 2, generator=g) < cfg.attribute_dropout   # drawn after the older draws: older
    no_onsets = torch.rand(batch, generator=g) < cfg.onset_dropout             # runs' draws stay as they were
    return use_text, which, keep, cut, no_melody, no_attribute, no_onsets


def training_condition(b: dict, cfg: StageConfig, use_text, which, keep, cut) -> torch.Tensor:
    """The MuLan tokens [B, Q_m] a training row is conditioned on: its audio's, or (cond_source text/mix) those
    of one of its captions; rows that are `cut` keep only their first `keep` levels, the rest null (level
    dropout). The draws come from the step's generator, so DDP ranks and a resumed run agree."""
    m = b["mulan"][:, : cfg.mulan_levels]
    if "mulan_text" in b:
        text = b["mulan_text"][torch.arange(len(m)), which % b["mulan_text"].shape[1], : cfg.mulan_levels]
        m = torch.where(use_text[:, None], text, m)
    levels = torch.arange(cfg.mulan_levels)[None]
    return torch.where(cut[:, None] & (levels >= keep[:, None]), cfg.mulan_codebook, m)


def with_condition(b: dict, name: str, cfg: StageConfig) -> tuple[dict, torch.Tensor | None]:
    """A held-out batch under one condition: the clip's audio tokens, another clip's (the next row's), the
    null condition, or the text tokens of its own caption (text) or of a re-phrasing of it (text_new)."""
    m, drop = b["mulan"][:, : cfg.mulan_levels], None
    if name == "other":
        m = m.roll(1, 0)
        if "attrs" in b:
            b = {**b, "attrs": b["attrs"].roll(1, 0)}
    elif name == "null":
        drop = torch.ones(len(m), dtype=torch.bool)
    elif name in ("text", "text_new"):
        m = b["mulan_text"][:, 0 if name == "text" else min(1, b["mulan_text"].shape[1] - 1), : cfg.mulan_levels]
    return {**b, "mulan": m}, drop


def condition_names(stage, cache: TokenCache) -> list[str]:
    """The conditions a stage is scored under: the one it trains on first."""
    if stage.role == "fine":
        return ["audio"]
    text = ["text", "text_new"] if "mulan_text" in cache.arrays else []
    first = "text" if stage.cfg.cond_source != "audio" and text else "audio"
    return [first] + [n for n in ["audio", "other", "null", *text] if n != first]


@torch.no_grad()
def evaluate(stage, cache: TokenCache, cfg: StageConfig, conditions: list[str] | None = None, model=None) -> dict:
    """Held-out loss and accuracy per level on fixed valid windows under the condition the stage trains on
    (its audio tokens, or for cond_source text/mix its caption's), and for a stage that reads a condition the
    loss under each other one ("cond/NAME": another clip's, null, text): null minus own is what it carries."""
    rows = cache.rows("valid") if len(cache.rows("valid")) else cache.rows("train")
    conditions = conditions or condition_names(stage, cache)
    model, totals = model or stage.model, {name: {} for name in conditions}
    was_training = model.training
    model.eval()

    def add(name: str, b: dict, condition: str) -> None:   # sum a batch's per-level loss, hits, count
        out = stage.loss(*with_condition(b, condition, cfg), model)
        for level, (ce, correct, n) in out["per_level"].items():
            t = totals.setdefault(name, {}).setdefault(level, [0.0, 0, 0])
            t[0], t[1], t[2] = t[0] + float(ce), t[1] + int(correct), t[2] + n

    for i in range(cfg.eval_batches):
        b, _ = batch_at(cache, rows, cfg, i, cfg.batch_size, seed_offset=99991, train=False)
        tune = b.pop("melody", None)   # scored as a text prompt runs; with its melody separately below
        if tune is not None and getattr(stage.cfg, "melody_input", False):
            add("melody", {**b, "melody": tune}, conditions[0])
        for name in conditions:
            add(name, b, name)
    model.train(was_training)
    names, main = stage.level_names(), totals[conditions[0]]
    res = {f"loss/{names[l]}": round(v[0] / v[2], 4) for l, v in sorted(main.items())}
    res.update({f"acc/{names[l]}": round(v[1] / v[2], 4) for l, v in sorted(main.items())})
    n = sum(v[2] for v in main.values())
    res["loss"] = round(sum(v[0] for v in main.values()) / n, 4)
    res["acc"] = round(sum(v[1] for v in main.values()) / n, 4)
    if len(conditions) > 1:
        res.update({f"cond/{name}": round(sum(v[0] for v in t.values()) / n, 4) for name, t in totals.items()
                    if name in conditions})
    if "melody" in totals:   # the same windows given their melody ids (--melody)
        res["loss/with_melody"] = round(sum(v[0] for v in totals["melody"].values()) / n, 4)
    return res


class StageTask:
    """A stage as a task of the one training loop (common/training.py)."""

    def __init__(self, cfg: StageConfig, cache: TokenCache):
        self.cfg, self.cache, self.kind = cfg, cache, cfg.kind
        torch.manual_seed(cfg.seed)
        self.stage = build_stage(cfg)
        self.model, self.rows = self.stage.model, train_rows(cache, cfg)

    def loss(self, model, step: int, micro: int, rank: int, world: int):
        b, drop = batch_at(self.cache, self.rows, self.cfg, step * self.cfg.grad_accum + micro, self.cfg.batch_size,
                           rank, world)
        out = self.stage.loss(b, drop, model)
        return out["loss"], {"_seen": b["acoustic"].shape[0] * b["acoustic"].shape[-1] / self.cfg.acoustic_rate}

    def evaluate(self, model) -> dict:
        return evaluate(self.stage, self.cache, self.cfg, model=model)

    def finish(self, model) -> Path:
        out = Path(self.cfg.out) / "model"
        save_stage(self.stage, out, meta={"steps": self.cfg.steps, "tokenizer_hashes": self.cache.index["tokenizer_hashes"]},
                   state_dict=model.state_dict())
        print(f"saved {out}", flush=True)
        return out


def mulan_code_vectors(cfg: StageConfig, cache: TokenCache) -> torch.Tensor | None:
    """The RVQ code vectors [Q_m, codebook + 1, E] of the MuLan named by `mulan_vectors` (a zero row for
    the null id), checked to be the MuLan that made the cache's tokens; None when the option is off."""
    if not cfg.mulan_vectors:
        return None
    if cfg.kind not in ("semantic", "delay", "masked") or cfg.role == "fine":
        raise UserError(f"mulan_vectors is an option of the semantic kind and of delay and masked stages that read "
                        f"MuLan tokens (this config: kind {cfg.kind}, role {cfg.role}); remove it")
    books = mulan_books(cfg.mulan_vectors, cache, "mulan_vectors=")
    if len(books) < cfg.mulan_levels or books.shape[1] != cfg.mulan_codebook:
        raise UserError(f"mulan_vectors={cfg.mulan_vectors}: its RVQ does not have {cfg.mulan_levels} levels of "
                        f"{cfg.mulan_codebook} codes like the cache")
    books = books[: cfg.mulan_levels]
    return torch.cat([books, books.new_zeros(len(books), 1, books.shape[-1])], 1)


def mulan_books(path: str | Path, cache: TokenCache, flag: str) -> torch.Tensor:
    """The RVQ code vectors [levels, codebook, E] of the MuLan checkpoint at `path`, checked to be the MuLan that
    made the cache's tokens (`flag` names the option in the errors)."""
    from common.checkpoint import load_checkpoint
    from data.tokenize import mulan_audio_hashes
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{flag}{path}: no MuLan checkpoint there; pass the MuLan that made the cache "
                        "(e.g. pretrained/mulan)")
    made_by = cache.index["tokenizer_hashes"].get("mulan")
    if made_by and made_by not in mulan_audio_hashes(path):
        raise UserError(f"{flag}{path} is not the MuLan that made {cache.root}'s tokens ({made_by}); pass that one")
    state = load_checkpoint(path, kind="mulan").state_dict
    books, q = [], 0
    while f"rvq.levels.{q}.codebook" in state:
        books.append(state[f"rvq.levels.{q}.codebook"].float())
        q += 1
    if not books:
        raise UserError(f"{flag}{path}: the checkpoint has no RVQ codebooks; pass a trained MuLan")
    return torch.stack(books)


def check_init(cfg: StageConfig):
    """The checkpoint `init` names, checked to be a stage of this kind and role (before any training starts)."""
    from common.checkpoint import load_checkpoint
    path = Path(cfg.init)
    if not (path / "config.json").is_file():
        raise UserError(f"init={path}: no checkpoint there; pass a stage's model folder (e.g. runs/delay_coarse/model)")
    from stages.base import stage_role
    ck = load_checkpoint(path)
    kind, role, mine = ck.config.get("kind"), ck.config.get("role"), stage_role(cfg)   # role "" = the kind's only one
    if kind != cfg.kind or role != mine:
        raise UserError(f"init={path} is a {kind} {role} stage, this config trains a {cfg.kind} {mine} one; "
                        "start from a checkpoint of the same kind and role")
    return ck


def warm_start(model: torch.nn.Module, ck, path: str) -> None:
    """Load `ck`'s weights into `model`; modules the checkpoint lacks keep their init (listed), anything else that
    does not fit is refused."""
    mine = model.state_dict()
    extra = [k for k in ck.state_dict if k not in mine]
    shapes = [k for k, v in ck.state_dict.items() if k in mine and mine[k].shape != v.shape]
    if extra or shapes:
        raise UserError(f"init={path} does not fit this config's model ({', '.join((extra + shapes)[:4])}); "
                        "start from a checkpoint with the same dims, depth and inputs")
    model.load_state_dict({k: v.to(mine[k].dtype) for k, v in ck.state_dict.items()}, strict=False)
    new = sorted({k.rsplit(".", 1)[0] for k in mine if k not in ck.state_dict})
    print(f"warm start from {path}" + (f"; new: {', '.join(new)}" if new else ""), flush=True)


def train(cfg: StageConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train (or resume) a stage; `stop_after` ends this run at that step, as a kill would, so a later
    --resume continues the same schedule (useful for time-boxed sessions)."""
    cache = TokenCache(cfg.cache)
    check_cache(cfg, cache)
    if cfg.train_clips > len(cache.rows("train")):   # here, not in check_cache: scoring held-out clips needs none
        raise UserError(f"train_clips={cfg.train_clips} but {cache.root} has {len(cache.rows('train'))} training "
                        "clips; lower it, or 0 for all")
    cfg.semantic_tokens = cfg.semantic_tokens or cache.index["semantic"].get("fingerprint", "")
    if cfg.cond_global and (cfg.kind not in ("delay", "masked") or cfg.role == "fine"):
        raise UserError(f"cond_global is an option of delay and masked stages that read MuLan tokens (this config: "
                        f"kind {cfg.kind}, role {cfg.role}); remove it")
    init = check_init(cfg) if cfg.init and not resume else None
    vectors = mulan_code_vectors(cfg, cache)
    cfg.mulan_vector_dim = 0 if vectors is None else vectors.shape[-1]
    task = StageTask(cfg, cache)
    if vectors is not None:
        task.model.cond_vectors.copy_(vectors)    # a buffer: saved with the weights, never trained
    if init is not None:
        warm_start(task.model, init, cfg.init)
    return run(task, cfg, resume, stop_after, fingerprints=cache.index["tokenizer_hashes"])


def main(kind: str) -> None:
    def run() -> None:
        ap = argparse.ArgumentParser(prog=f"python -m stages.{kind}", description=f"Train the {kind} stage.")
        ap.add_argument("--config", default=f"configs/{kind}.yaml")
        ap.add_argument("--resume", action="store_true")
        ap.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="save and stop at this step (continue later with --resume)")
        ap.add_argument("overrides", nargs="*", help="key=value")
        args = parse_args_with_overrides(ap)
        cfg = load_config(StageConfig, args.config, args.overrides)
        if cfg.kind != kind:
            raise UserError(f"{args.config} is a '{cfg.kind}' config; use python -m stages.{cfg.kind}")
        train(cfg, resume=args.resume, stop_after=args.stop_after)
    run_cli(run)
